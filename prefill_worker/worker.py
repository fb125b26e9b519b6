"""The prefill worker: computes prompts and streams their KV into decode workers' blocks.

A request passes through these queues::

    Prefill(ticket) ──> waiting ──(scheduled; chunked prefill)──> running
        ──(final chunk: after each layer, send_layer into the ticket's blocks)──>
        sending ──(sender SUCCESS: D has every layer)──> done: release blocks, reply
                 ──(sender FAILED)──────────────────────> done: release, ABORTED

``waiting``/``running`` are the engine scheduler's queues; ``sending`` and ``done`` are
this module's. The engine's KV layer hook runs on the engine thread after each layer;
on a request's final prefill chunk every earlier chunk's KV is already in the cache, so
the hook queues that layer's pages for the whole prompt (kv_transfer gathers and sends
on its own thread) while the next layers compute. Blocks are released only once the
sender is SUCCESS or FAILED, so pages are never overwritten while being sent.

A prefill that fails alone (non-finite logits, an exception while sending its layers or
handling its output) aborts its KV stream, so the decode worker frees the reservation,
and replies INTERNAL; the loop goes on. While the loop does not serve (dead or
stalled) new prefills get UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from decode_worker.info import stats_response
from decode_worker.runtime import EngineLoop, WorkerConfig, WorkerError
from engine.engine import LLMEngine
from engine.kv_handoff import LayerKV
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVClient, KVSender, TransferConfig, TransferState, make_client
from proto import worker_pb2 as pb
from proto.convert import prompt_logprobs_to_pb, token_to_pb

logger = logging.getLogger(__name__)

Reply = Callable[[pb.PrefillResponse | WorkerError], None]


@dataclass
class _Job:
    request_id: str
    params: SamplingParams
    prompt_len: int
    sender: KVSender
    num_cached_blocks: int
    reply: Reply
    state: str = "waiting"
    """waiting | running | sending."""
    first: RequestOutput | None = None
    sent_layers: int = 0
    t_first_layer: float = 0.0
    prompt: list[int] = field(default_factory=list)
    """Kept only when the prompt is scored (``params.prompt_logprobs``)."""


class PrefillWorker:
    """Engine + KV clients + the job table; thread-safe (see runtime.EngineLoop)."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config
        self._clients: dict[str, KVClient] = {}
        self._jobs: dict[str, _Job] = {}
        self._block_bytes = engine.layout.block_bytes
        engine.kv_layer_hook = self._on_layer
        self.publishes_events = False
        """Set when a Redis publisher consumes the block events (router/publisher.py)."""
        self.loop = EngineLoop(
            engine, self._on_outputs, self._housekeeping, config.name, config.stall_timeout_s
        )
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()
        for client in self._clients.values():
            client.close()

    def client(self, backend: str) -> KVClient:
        if backend not in self.config.kv_transports:
            raise WorkerError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"kv transport {backend!r} is not enabled on {self.config.name}; "
                f"enabled: {list(self.config.kv_transports)}",
            )
        with self.loop.lock:
            if backend not in self._clients:
                tcfg = TransferConfig(
                    host=self.config.host, plane=dict(self.config.extra), secret=self.config.secret
                )
                self._clients[backend] = make_client(backend, self.engine.layout_spec, config=tcfg)
            return self._clients[backend]

    # -- requests (any thread) ------------------------------------------------------------

    def submit(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        sender: KVSender,
        num_cached_blocks: int,
        reply: Reply,
    ) -> None:
        """Queue a prefill whose KV goes to ``sender``; ``reply`` gets the outcome once."""
        try:
            self.loop.check_serving()
        except WorkerError as exc:
            sender.abort(str(exc))
            raise
        bs = self.engine.layout.block_size
        need = -(-len(prompt) // bs) - num_cached_blocks
        if need != len(sender.ticket.block_ids):
            sender.abort("prefill refused the ticket")
            raise WorkerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ticket has {len(sender.ticket.block_ids)} blocks but a {len(prompt)}-token "
                f"prompt with {num_cached_blocks} cached blocks needs {need} (block_size={bs})",
            )
        try:
            self.engine.prepare(params)  # compile a new grammar outside the lock
            with self.loop.lock:
                self.engine.add_request(rid, prompt, params, prefill_only=True)
                job = _Job(rid, params, len(prompt), sender, num_cached_blocks, reply)
                job.prompt = prompt if params.prompt_logprobs is not None else []
                self._jobs[rid] = job
        except ValueError as exc:
            sender.abort(f"prefill refused: {exc}")
            raise WorkerError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.loop.wake()

    def abort(self, rid: str) -> bool:
        with self.loop.lock:
            job = self._jobs.pop(rid, None)
            if job is not None:
                job.sender.abort("aborted by the router")
                job.reply(WorkerError(grpc.StatusCode.ABORTED, f"request {rid} was aborted"))
            return self.engine.abort(rid) or job is not None

    def fail_all(self, why: str) -> None:
        """Fail every prefill with ``why`` (the engine cannot go on, e.g. an EP rank died):
        each KV stream is aborted, so its decode worker frees the reserved blocks."""
        for job in list(self._jobs.values()):
            job.sender.abort(why)
            job.reply(WorkerError(grpc.StatusCode.UNAVAILABLE, why))
        self._jobs.clear()

    def stats(self, drain_events: bool | None = None) -> pb.StatsResponse:
        """Load and counters; block events are drained only by their consumer: the Redis
        publisher when there is one (``publishes_events``), else the ``Stats`` caller."""
        drain = not self.publishes_events if drain_events is None else drain_events
        with self.loop.hold():
            sched = self.engine.scheduler
            sending = sum(1 for j in self._jobs.values() if j.state == "sending")
            queued = sum(r.num_prompt_tokens - r.num_computed_tokens for r in sched.waiting)
            queued += sum(r.num_prompt_tokens - r.num_computed_tokens for r in sched.running)
            queues = {"waiting": len(sched.waiting), "running": len(sched.running)}
            queues["sending"] = sending
            return stats_response(self.engine, queues, queued, len(self._jobs), drain)

    # -- engine thread -------------------------------------------------------------------

    def _on_layer(
        self, layer: int, items: list[LayerKV], cache: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        # Runs inside the batch's model forward: whatever one item raises must stay with
        # that item's transfer, or it would end the whole step.
        for item in items:
            job = self._jobs.get(item.request_id)
            if job is None:
                continue
            job.state = "running"
            if item.end_pos < job.prompt_len:
                continue  # not the final chunk: this layer is sent once the prompt is whole
            try:
                self._send_layer(job, layer, item, cache)
            except Exception as exc:
                logger.exception("sending layer %d of %s failed", layer, job.request_id)
                job.sender.abort(f"prefill could not send layer {layer} ({type(exc).__name__})")

    def _send_layer(self, job: _Job, layer: int, item: LayerKV, cache) -> None:
        #  prefill block table:  [ cached on D | blocks to fill ... ]
        #                          0 .. nc-1     nc .. nc+len(ticket)-1  -> ticket.block_ids
        nc, n = job.num_cached_blocks, len(job.sender.ticket.block_ids)
        src = item.block_ids[nc : nc + n]
        if layer == 0:
            job.t_first_layer = time.monotonic()
        try:
            job.sender.send_layer(layer, cache[0], cache[1], src_block_ids=src)
        except ValueError as exc:
            job.sender.abort(f"prefill could not send layer {layer}: {exc}")
            return
        job.sent_layers += 1
        if job.sent_layers == self.engine.layout.num_layers:
            job.sender.finish()

    def _on_outputs(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            job = self._jobs.get(out.request_id)
            if job is None or not out.finished:
                continue
            if out.error is not None:
                self._fail_job(job, out.error)
            else:
                job.first, job.state = out, "sending"

    def _fail_job(self, job: _Job, why: str) -> None:
        """``job`` failed alone: abort its KV stream (D frees the reservation), reply
        INTERNAL, free its blocks."""
        msg = f"request {job.request_id} failed on {self.config.name}: {why}"
        job.sender.abort(msg)
        job.first = None  # its blocks are not sent on: _finish frees rather than releases
        self._finish(job, WorkerError(grpc.StatusCode.INTERNAL, msg))

    def _housekeeping(self) -> bool:
        in_flight = False
        for job in list(self._jobs.values()):
            try:
                in_flight |= self._advance(job)
            except Exception as exc:
                logger.exception("prefill %s failed in its transfer", job.request_id)
                self._fail_job(job, f"internal error ({type(exc).__name__})")
        return in_flight

    def _advance(self, job: _Job) -> bool:
        state = job.sender.poll()
        if state is TransferState.FAILED:
            self._finish(job, WorkerError(grpc.StatusCode.ABORTED, self._why(job)))
        elif state is TransferState.SUCCESS and job.first is not None:
            self._finish(job, self._response(job))
        return job.state == "sending" and job.request_id in self._jobs

    def _why(self, job: _Job) -> str:
        return f"KV transfer to {job.sender.ticket.endpoint} failed: {job.sender.error}"

    def _finish(self, job: _Job, result: pb.PrefillResponse | WorkerError) -> None:
        self._jobs.pop(job.request_id, None)
        if job.first is not None:
            self.engine.release(job.request_id)
        else:
            self.engine.abort(job.request_id)
        job.reply(result)

    def _response(self, job: _Job) -> pb.PrefillResponse:
        out = job.first
        lps = out.new_logprobs[0] if out.new_logprobs else None
        n = len(job.sender.ticket.block_ids)
        return pb.PrefillResponse(
            first_token=token_to_pb(out.new_token_ids[0], lps, job.params.logprobs),
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            transfer_bytes=2 * n * self._block_bytes * self.engine.layout.num_layers,
            transfer_seconds=time.monotonic() - job.t_first_layer,
            prompt_logprobs=prompt_logprobs_to_pb(
                job.prompt, out.prompt_logprobs, job.params.prompt_logprobs
            ),
        )
