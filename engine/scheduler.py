"""Continuous batching with chunked prefill and preemption by recompute.

A request moves through::

    waiting ──schedule──> running ──finish/abort──> (gone)
       ▲                     │
       └──── preempted ──────┘   (blocks freed; recomputed from scratch later)

Each step spends a token budget: running requests first (decodes take one token, a
partially prefilled prompt takes its next chunk), then waiting requests in FCFS order.
When the pool runs dry, the most recently admitted running request is preempted.
"""

from __future__ import annotations

import logging
from collections import deque

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager, PrefixHit
from engine.request import Request, RequestOutput, RequestStatus
from engine.scheduler_output import (
    SampledToken,
    SampleFailure,
    SamplerInit,
    ScheduledSequence,
    SchedulerOutput,
)

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        """Preemptions since start (a metric; tests use it to prove preemption happened)."""

    # -- queue management -------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Admit a request whose prompt KV is already in its blocks (disaggregated decode)."""
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus, free: bool = True) -> None:
        """Move ``request`` out of the queues; ``free=False`` keeps its blocks (KV hand-off)."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)
        if free:
            self.kv.free(request.request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        budget, preempted = self._schedule_running(budget, scheduled)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        return self._build_output(scheduled)

    def _schedule_running(self, budget: int, out: list[tuple[Request, int]]) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append((req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted; everything after it is gone too
        return budget, preempted

    def _schedule_waiting(self, budget: int, out: list[tuple[Request, int]]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            scored = req.sampling_params.prompt_logprobs is not None and not req.prompt_logprobs_done  # fmt: skip
            # A prefix hit computes no logits, so a prompt to be scored is computed whole,
            # on the EP leader (which has the hidden rows it scores).
            prefix = PrefixHit([], 0) if scored else self.kv.find_prefix(req)
            n = req.num_tokens - prefix.num_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = prefix.num_tokens
            req.num_computed_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.append((req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        if not req.prompt_logprobs_done:
            req.prompt_logprobs.clear()  # recomputed from the start
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _build_output(self, scheduled: list[tuple[Request, int]]) -> SchedulerOutput:
        seqs = [self._sequence(req, n) for req, n in scheduled]
        seqs.sort(key=lambda s: s.num_tokens != 1)  # stable: decodes first
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(
            sequences=tuple(seqs),
            num_decodes=sum(1 for s in seqs if s.num_tokens == 1),
            finished_request_ids=finished,
        )

    def _sequence(self, req: Request, n: int) -> ScheduledSequence:
        start = req.num_computed_tokens
        params = req.sampling_params
        suppress: tuple[int, ...] = ()
        if len(req.output_token_ids) < params.min_tokens:
            eos = () if params.ignore_eos else req.eos_token_ids
            suppress = eos + params.stop_token_ids
        sample = start + n == req.num_tokens
        return ScheduledSequence(
            request_id=req.request_id,
            token_ids=tuple(req.all_token_ids[start : start + n]),
            start_pos=start,
            block_ids=tuple(self.kv.block_ids(req.request_id)),
            sample=sample,
            sampling_params=params,
            suppress_token_ids=suppress,
            stream_kv=req.prefill_only,
            sampler_init=self._sampler_init(req) if sample else None,
            **_prompt_scoring(req, start, n),
        )

    def _sampler_init(self, req: Request) -> SamplerInit | None:
        params = req.sampling_params
        if not params.needs_state or req.sampler_initialised:
            return None
        req.sampler_initialised = True
        prompt = tuple(req.prompt_token_ids) if params.repetition_penalty != 1.0 else ()
        return SamplerInit(prompt, tuple(req.output_token_ids))

    # -- after the step -------------------------------------------------------------------

    def update(
        self,
        output: SchedulerOutput,
        sampled: dict[str, SampledToken | SampleFailure],
        prompt_logprobs: dict[str, list[dict[int, float]]] | None = None,
    ) -> list[RequestOutput]:
        """Advance computed counts, append sampled tokens, finish what has stopped.

        A request whose row failed, or whose bookkeeping raises, fails alone
        (``FINISHED_ERROR``, blocks freed); the others in the step carry on."""
        results = []
        for seq in output.sequences:
            req = self.requests.get(seq.request_id)
            if req is None:  # aborted while the step ran
                continue
            if prompt_logprobs and seq.request_id in prompt_logprobs:
                req.prompt_logprobs.extend(prompt_logprobs[seq.request_id])
            try:
                out = self._update_one(req, seq, sampled)
            except Exception as exc:
                logger.exception("request %s failed after its step", req.request_id)
                self.fail(req, f"internal error while updating the request ({type(exc).__name__})")
                out = make_output(req, 0)
            if out is not None:
                results.append(out)
        return results

    def _update_one(
        self,
        req: Request,
        seq: ScheduledSequence,
        sampled: dict[str, SampledToken | SampleFailure],
    ) -> RequestOutput | None:
        req.num_computed_tokens += seq.num_tokens
        if not seq.sample:
            return None
        token = sampled[seq.request_id]
        if isinstance(token, SampleFailure):
            self.fail(req, token.reason)
            return make_output(req, 0)
        req.append_output(token.token_id, token.logprobs)
        status = self.stop_status(req)
        if status is not None:
            self.finish(req, status, free=status is not RequestStatus.FINISHED_PREFILLED)
        return make_output(req, 1)

    def fail(self, request: Request, reason: str) -> None:
        """End ``request`` alone with ``FINISHED_ERROR`` and free its blocks."""
        logger.warning("request %s failed: %s", request.request_id, reason)
        request.error = reason
        self.finish(request, RequestStatus.FINISHED_ERROR)

    def stop_status(self, req: Request) -> RequestStatus | None:
        """Why ``req`` must stop after its latest token, or ``None`` to go on."""
        if req.prefill_only:
            return RequestStatus.FINISHED_PREFILLED
        params, last = req.sampling_params, req.output_token_ids[-1]
        n = len(req.output_token_ids)
        if n >= params.min_tokens:
            # Under a grammar the mask allows EOS only once the output is complete.
            eos_stops = not params.ignore_eos or params.structured is not None
            if (last in req.eos_token_ids and eos_stops) or last in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _prompt_scoring(req: Request, start: int, n: int) -> dict:
    """``ScheduledSequence`` fields asking the runner to score the prompt tokens this
    chunk predicts (engine/prompt_logprobs.py)."""
    top = req.sampling_params.prompt_logprobs
    end = req.num_prompt_tokens
    if top is None or req.prompt_logprobs_done or start >= end:
        return {}
    return {"prompt_logprobs": top, "prompt_targets": tuple(req.prompt_token_ids[start + 1 : min(start + n + 1, end)])}  # fmt: skip


def make_output(req: Request, num_new: int) -> RequestOutput:
    """The last ``num_new`` tokens of ``req`` as a :class:`RequestOutput`."""
    logprobs = req.output_logprobs[-num_new:] if num_new and req.output_logprobs else []
    first = num_new and len(req.output_token_ids) == num_new
    scored = req.sampling_params.prompt_logprobs is not None and req.prompt_logprobs_done
    return RequestOutput(
        request_id=req.request_id,
        new_token_ids=req.output_token_ids[-num_new:] if num_new else [],
        new_logprobs=logprobs,
        finished=req.is_finished,
        finish_reason=req.finish_reason,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=req.num_cached_tokens,
        num_output_tokens=len(req.output_token_ids),
        error=req.error,
        prompt_logprobs=list(req.prompt_logprobs) if first and scored else None,
    )
