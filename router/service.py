"""The router's work behind the HTTP routes: validate, admit, route, run (router/run.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.kv_cache.hashing import hash_blocks
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.api import Shaper
from router.cluster import ClusterState, WorkerRecord
from router.metrics import Metrics
from router.policy import NoWorkerError, RouteDecision, RouteRequest, RoutingPolicy
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from router.run import Job, Output, RequestRun
from router.workers import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """Router settings (``pdserve serve`` flags)."""

    model: str
    """Checkpoint directory: the tokenizer and chat template come from it."""
    served_model_name: str
    """The ``model`` name clients must send."""
    kv_transport: str = "auto"
    """KV backend between prefill and decode; ``auto`` = shm on one host, else tcp."""
    local_prefill_tokens: int = 0
    """Prefill on the decode worker when at most this many prompt tokens are uncached."""
    prefill_overload_factor: float = 8.0
    """Prefill on the decode worker when remote prefill's predicted TTFT exceeds this many
    times local prefill's (router/policy.py); 0 = never for that reason."""
    prefill_timeout_s: float = 30.0
    """Give up on remote prefill (and fall back to local) after this long."""
    request_timeout_s: float = 600.0
    """Abort a request on every worker after this long."""
    lease_s: float = 30.0
    """How long a decode worker keeps blocks reserved for a transfer."""
    max_inflight: int = 256
    """Requests in flight above which new ones get 429."""
    api_key: str | None = None
    """Require ``Authorization: Bearer <key>`` on /v1 routes."""

    def __post_init__(self) -> None:
        if self.local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, got {self.local_prefill_tokens}")
        if self.prefill_overload_factor < 0:
            raise ValueError(
                f"prefill_overload_factor must be >= 0 (0 = off), got {self.prefill_overload_factor}"
            )
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")


class RouterService:
    def __init__(
        self,
        config: RouterConfig,
        state: ClusterState,
        registry: Registry,
        policy: RoutingPolicy,
        metrics: Metrics,
        tokenizer: Tokenizer,
    ) -> None:
        self.config = config
        self.state, self.registry, self.policy = state, registry, policy
        self.metrics, self.tokenizer = metrics, tokenizer
        self.inflight = 0
        self._tasks: set[asyncio.Task] = set()

    # -- requests -> jobs --------------------------------------------------------------------

    def completion_job(self, body: CompletionRequest) -> tuple[Job, Shaper]:
        self.check_model(body.model)
        prompt = body.prompt
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        job = self.prepare(ids, _sampling(body, body.logprobs), body.stop, body.max_tokens)
        return job, self._shaper("completion", job, body.logprobs, body.return_token_ids)

    def chat_job(self, body: ChatCompletionRequest) -> tuple[Job, Shaper]:
        self.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, body.add_generation_prompt)
        except Exception as exc:  # template errors come from the caller's messages
            raise ApiError(400, f"chat template failed: {exc}", param="messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = self.prepare(ids, _sampling(body, top), body.stop, body.requested_max_tokens)
        job.request_id = "chatcmpl-" + job.request_id.removeprefix("cmpl-")
        return job, self._shaper("chat", job, top, body.return_token_ids)

    def _shaper(self, kind: str, job: Job, logprobs: int | None, token_ids: bool) -> Shaper:
        name = self.config.served_model_name
        return Shaper(kind, job.request_id, name, self.tokenizer, logprobs, token_ids)

    def check_model(self, name: str) -> None:
        served = self.config.served_model_name
        if name != served:
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves `{served}`.",
                param="model",
                code="model_not_found",
            )

    # -- validation -------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int | None:
        lens = [w.max_model_len for w in self.state.workers(healthy_only=False)]
        return min(lens) if lens else None

    def prepare(
        self, prompt: list[int], params: dict, stop: list[str], max_tokens: int | None
    ) -> Job:
        """Check the prompt against the context limit and build the job (ApiError 400)."""
        limit = self.max_model_len
        if limit is None:
            raise ApiError(503, "no worker registered yet", "service_unavailable", headers={"Retry-After": "5"})  # fmt: skip
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")  # fmt: skip
        n = len(prompt)
        room = limit - n
        if room < 1 or (max_tokens is not None and max_tokens > room):
            want = n + (max_tokens or 1)
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {want} tokens ({n} in the prompt, {want - n} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if room >= 1 else "prompt",
                code="context_length_exceeded",
            )
        params = {**params, "max_tokens": max_tokens or room}
        try:
            sp = SamplingParams(**params)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(f"cmpl-{uuid.uuid4().hex[:16]}", prompt, sp, stop)

    def admit(self) -> None:
        if self.inflight >= self.config.max_inflight:
            raise ApiError(
                429,
                f"the router has {self.inflight} requests in flight (limit "
                f"{self.config.max_inflight}); retry later",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    # -- generation -----------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Output]:
        """Run ``job``; abort it on every worker unless it finished by itself."""
        self.admit()
        self.inflight += 1
        self.metrics.inflight.inc()
        run = RequestRun(self, job)
        try:
            async for out in run.outputs():
                yield out
            self.metrics.requests.labels(outcome=run.finish_reason or "error").inc()
        except Exception:
            self.metrics.requests.labels(outcome="error").inc()
            raise
        except BaseException:  # cancelled: client gone or timed out
            self.metrics.requests.labels(outcome="cancelled").inc()
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            await run.cleanup()

    def background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def route(self, job: Job, attempts: int = 3) -> RouteDecision:
        """Route ``job`` and hold one in-flight slot on its decode worker (the caller
        releases it with ``state.add_inflight(worker, -1)``).

        The slot is taken with ``state.reserve``: when another router took the worker
        since this one read its load, route again on the fresh state.
        """
        layout = self.registry.layout
        hashes = hash_blocks(job.prompt, layout.block_size) if layout else []
        for _ in range(attempts):
            try:
                decision = self.policy.route(RouteRequest(len(job.prompt), hashes), self.state)
            except NoWorkerError as exc:
                raise ApiError(
                    503, f"{exc}; retry later", "service_unavailable", headers={"Retry-After": "5"}
                ) from None
            d = decision.decode
            if self.state.reserve(d.worker_id, d.inflight):
                return decision
            self.metrics.reservation_conflicts.inc()
        self.state.add_inflight(d.worker_id, 1)  # contended: take it anyway
        return decision

    def transport(self, p: WorkerRecord, d: WorkerRecord) -> str:
        if self.config.kv_transport != "auto":
            return self.config.kv_transport
        same_host = p.hostname == d.hostname and "shm" in d.kv_transports
        return "shm" if same_host and "shm" in p.kv_transports else "tcp"


def _sampling(body: CompletionRequest | ChatCompletionRequest, logprobs: int | None) -> dict:
    """Engine SamplingParams fields from a request (OpenAI defaults where unset)."""
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.effective_top_k,
        "seed": body.seed,
        "stop_token_ids": tuple(body.stop_token_ids),
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "logprobs": logprobs,
    }
