"""The gRPC side both worker roles share: the common rpcs (Abort, Health, Info, Stats) and
the helpers their own rpcs use to reach the engine thread.

A role's service (decode_worker/service.py, prefill_worker/service.py) implements only
its own rpcs; ``engine/worker/host.py`` serves them together with :class:`CommonService`
as one gRPC service (engine/worker/grpc_server.py).

Handlers never call the engine (it is the engine thread's, engine/worker/loop.py), with
one exception: ``engine.grammars``, the structured-output grammar cache
(engine/grammar.py), which :func:`compile_grammar` fills before a request's command is
submitted. It is thread-safe and llguidance compiles without the GIL, so a new JSON
schema or regex is compiled on an executor thread while the engine thread keeps
stepping the batch; on the engine thread the request then finds its grammar compiled
(a cache hit), and a spec that cannot compile is refused here, before any KV block is
reserved or any connection to a decode worker opened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from engine.grammar import GrammarBackend
from engine.sampling_params import SamplingParams
from engine.worker.commands import Abort
from engine.worker.errors import WorkerError
from engine.worker.info import health_response, stats_response, worker_info
from engine.worker.loop import EngineLoop
from engine.worker.roles import RoleWorker
from engine.worker.sink import Sink
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


async def ask(
    context: grpc.aio.ServicerContext, loop: EngineLoop, command: Any, new_work: bool = True
) -> Any:
    """Run ``command`` on the engine thread; its ``WorkerError`` becomes the call's status.
    ``new_work`` is refused at once (UNAVAILABLE) while the loop does not serve."""
    try:
        if new_work:
            loop.check_serving()
        return await asyncio.wrap_future(loop.submit(command))
    except WorkerError as exc:
        await context.abort(exc.code, str(exc))


async def call_worker(
    context: grpc.aio.ServicerContext, fn: Callable, *args: Any, thread: bool = False
) -> Any:
    """``fn(*args)`` (in the default executor with ``thread``: it blocks, e.g. connecting
    a KV sender); ``WorkerError`` / ``ValueError`` become the call's status."""
    try:
        if thread:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)
    except WorkerError as exc:
        await context.abort(exc.code, str(exc))
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


async def compile_grammar(
    context: grpc.aio.ServicerContext, grammars: GrammarBackend, params: SamplingParams
) -> None:
    """Compile ``params``' grammar into the engine's cache on an executor thread (see the
    module docstring); a spec that cannot compile is the call's INVALID_ARGUMENT."""
    if params.structured is not None:
        await call_worker(context, grammars.prepare, params.structured, thread=True)


async def stream_sink(
    sink: Sink, abort: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.TokenChunk]:
    """Yield chunks until the finished one; ``abort()`` the request if the caller goes."""
    finished = False
    try:
        while not finished:
            try:
                chunk = await sink.get()
            except WorkerError as exc:
                finished = True
                await context.abort(exc.code, str(exc))
            finished = chunk.finished
            yield chunk
    finally:
        if not finished:
            try:
                await asyncio.shield(abort())
            except WorkerError as exc:  # the loop ended: nothing is left to abort
                logger.debug("abort after a closed stream: %s", exc)


def abort_of(loop: EngineLoop, request_id: str) -> Callable[[], Awaitable[Any]]:
    """``await abort_of(loop, rid)()`` aborts ``rid`` on the engine thread."""
    return lambda: asyncio.wrap_future(loop.submit(Abort(request_id)))


class CommonService:
    """Abort, Health, Info and Stats, for a worker of either role."""

    def __init__(self, worker: RoleWorker) -> None:
        self.worker = worker
        self.address = ""
        """The gRPC address, once the server is bound (``Info`` reports it)."""

    def methods(self) -> dict[str, Callable]:
        return {"Abort": self.Abort, "Health": self.Health, "Info": self.Info, "Stats": self.Stats}

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        found = await ask(context, self.worker.loop, Abort(request.request_id), new_work=False)
        return pb.AbortResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return health_response(self.worker.loop.health())

    async def Info(self, request, context) -> pb.InfoResponse:
        w = self.worker
        return worker_info(w.engine, w.config, self.address, w.kv_transports())

    async def Stats(self, request, context) -> pb.StatsResponse:
        """The latest snapshot; refused (UNAVAILABLE) while the loop does not serve, as the
        snapshot of a stalled or dead loop would be stale. Block events go to this caller
        only when no Redis publisher consumes them."""
        loop = self.worker.loop
        await call_worker(context, loop.check_serving)
        events = ([], []) if loop.block_events.publisher else loop.block_events.take()
        return stats_response(loop.snapshot, self.worker.transfer_stats(), events)
