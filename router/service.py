"""The router's work behind the HTTP routes: validate, admit, route, run (router/run.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from engine.config.router import RouterConfig
from engine.kv_cache.hashing import hash_blocks
from engine.tokenizer import Tokenizer
from router.api import Echo, Shaper
from router.job import Job, Output
from router.jobs import JobBuilder
from router.metrics import Metrics
from router.policy import NoWorkerError, RouteDecision, RouteRequest, RoutingPolicy
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from router.run import RequestRun
from router.state.base import ClusterState, WorkerRecord
from router.tools.formats import get_format
from router.workers import Registry

logger = logging.getLogger(__name__)

TOKENIZER_THREADS = 4
"""Threads that run chat templates and tokenization, so the event loop never does."""


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
        self.io = registry.io
        """Cluster-state calls, off the event loop when they block (router/state_calls.py)."""
        self.metrics, self.tokenizer = metrics, tokenizer
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task] = set()
        fmt = get_format(config.tool_call_parser) if config.tool_call_parser else None
        self.tool_format = fmt
        self.jobs = JobBuilder(
            tokenizer, config.model, config.max_prompt_chars, TOKENIZER_THREADS, fmt
        )

    # -- requests -> jobs (router/jobs.py) --------------------------------------------------

    async def completion_jobs(self, body: CompletionRequest) -> tuple[list[Job], Shaper]:
        limit = self._admissible(body.model, body.n)
        jobs = await self.jobs.completion(body, limit)
        shaper = self._shaper("completion", jobs[0], body.logprobs, body.return_token_ids)
        if body.echo:
            prompt = jobs[0].prompt
            text = body.prompt if isinstance(body.prompt, str) else self.tokenizer.decode(prompt)
            shaper.echo = Echo(text, prompt)
        return jobs, shaper

    async def chat_jobs(self, body: ChatCompletionRequest) -> tuple[list[Job], Shaper]:
        limit = self._admissible(body.model, body.n)
        jobs = await self.jobs.chat(body, limit)
        top = (body.top_logprobs or 0) if body.logprobs else None
        shaper = self._shaper("chat", jobs[0], top, body.return_token_ids)
        choice = body.effective_tool_choice
        if body.tools and choice != "none":
            shaper.tool_format = self.tool_format
            shaper.named_tool = not isinstance(choice, str)
        return jobs, shaper

    def _admissible(self, model: str, n: int = 1) -> int:
        """The context length, once the model name and the router's capacity allow the
        request: refused before any tokenization costs the router anything."""
        self.check_model(model)
        self.admit(n)
        limit = self.max_model_len
        if limit is None:
            raise ApiError(503, "no worker registered yet", "service_unavailable", headers={"Retry-After": "5"})  # fmt: skip
        return limit

    def _shaper(self, kind: str, job: Job, logprobs: int | None, token_ids: bool) -> Shaper:
        name = self.config.served_model_name
        return Shaper(kind, job.request_id, name, self.tokenizer, logprobs, token_ids)

    def check_model(self, name: str) -> None:
        served = self.config.served_model_name
        if name != served:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError(
                404,
                f"The model `{shown}` does not exist; this server serves `{served}`.",
                param="model",
                code="model_not_found",
            )

    @property
    def max_model_len(self) -> int | None:
        """The context every worker can hold: its max_model_len, and the tokens its KV
        blocks hold (a longer request could never be scheduled, and would hang)."""
        lens = [
            min(w.max_model_len, w.num_blocks * w.layout.block_size)
            for w in self.registry.known_workers()
        ]
        return min(lens) if lens else None

    def admit(self, n: int = 1) -> None:
        """Room for ``n`` more generations (a request's choices), else 429."""
        if self.inflight + n > self.config.max_inflight:
            raise ApiError(
                429,
                f"the router has {self.inflight} requests in flight (limit "
                f"{self.config.max_inflight}; this request needs {n}); retry later",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    # -- generation -----------------------------------------------------------------------

    async def generate(self, job: Job, admit: bool = True) -> AsyncIterator[Output]:
        """Run ``job``; abort it on every worker unless it finished by itself. The
        in-flight slot taken here is released on every path, exceptions included.
        ``admit=False``: a later choice of a request admitted for all its choices."""
        if admit:
            self.admit()
        self.inflight += 1
        self.metrics.inflight.inc()
        self._idle.clear()
        run, outcome = None, "error"
        try:
            run = RequestRun(self, job)
            async for out in run.outputs():
                yield out
            outcome = run.finish_reason or "error"
        except BaseException as exc:  # cancelled or closed: client gone or timed out
            if isinstance(exc, Exception):
                outcome = "error"
            else:  # closed after its last output (a one-token stream) is not cancelled
                outcome = (run and run.finish_reason) or "cancelled"
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.requests.labels(outcome=outcome).inc()
            if not self.inflight:
                self._idle.set()
            if run is not None:
                await run.cleanup()

    def background(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, timeout_s: float = 5.0) -> None:
        """At shutdown: let cancelled requests finish cleaning up and their aborts reach
        the workers (before the gRPC channels close), then stop the tokenizer pool."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        self.jobs.close()

    async def route(self, job: Job, attempts: int = 3) -> RouteDecision:
        """Route ``job`` and hold one in-flight slot on its decode worker (the caller
        releases it with ``state.add_inflight(worker, -1)``).

        One decision reads the state once (``state.view``: for Redis one round trip, off
        the event loop) and takes the slot with ``state.reserve``, a compare-and-increment:
        when another router took the worker since this one read its load, route again on
        the fresh state.
        """
        layout = self.registry.layout
        hashes = hash_blocks(job.prompt, layout.block_size) if layout else []
        for _ in range(attempts):
            view = await self.io(self.state.view, hashes)
            try:
                decision = self.policy.route(RouteRequest(len(job.prompt), hashes), view)
            except NoWorkerError as exc:
                raise ApiError(
                    503, f"{exc}; retry later", "service_unavailable", headers={"Retry-After": "5"}
                ) from None
            d = decision.decode
            if await self.io(self.state.reserve, d.worker_id, d.inflight):
                return decision
            self.metrics.reservation_conflicts.inc()
        await self.io(self.state.add_inflight, d.worker_id, 1)  # contended: take it anyway
        return decision

    def transport(self, p: WorkerRecord, d: WorkerRecord) -> str:
        if self.config.kv_transport != "auto":
            return self.config.kv_transport
        same_host = p.hostname == d.hostname and "shm" in d.kv_transports
        return "shm" if same_host and "shm" in p.kv_transports else "tcp"
