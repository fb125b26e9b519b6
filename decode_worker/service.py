"""gRPC servicer of the decode worker: thin adapters from worker.proto to DecodeWorker."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator

import grpc

from decode_worker.info import health_response, worker_info
from decode_worker.runtime import Sink, WorkerError
from decode_worker.worker import DecodeWorker
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from proto.convert import params_from_pb

logger = logging.getLogger(__name__)

MAX_LEASE_S = 3600.0
"""Longest lease a Reserve may ask for: the blocks of a transfer that never comes are
free again by then (an infinite lease would hold them for good)."""


async def in_thread(fn, *args):
    """Run a (lock-taking) worker call off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def call_worker(context: grpc.aio.ServicerContext, fn, *args):
    """Run a worker call; map ``WorkerError``/``ValueError`` to a gRPC status."""
    try:
        return await in_thread(fn, *args)
    except WorkerError as exc:
        await context.abort(exc.code, str(exc))
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


async def stream_sink(
    sink: Sink, abort, request_id: str, context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.TokenChunk]:
    """Yield chunks until the finished one; abort the request if the caller goes away."""
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
            await asyncio.shield(in_thread(abort, request_id))


class DecodeServicer(rpc.DecodeServiceServicer):
    def __init__(self, worker: DecodeWorker, address: str) -> None:
        self.worker = worker
        self.address = address

    async def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveResponse:
        spec = request.request
        params = await call_worker(context, params_from_pb, spec.params)
        lease = request.lease_s or self.worker.config.lease_s
        if not (math.isfinite(lease) and 0 < lease <= MAX_LEASE_S):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lease_s must be in (0, {MAX_LEASE_S}] seconds (0 = this worker's default "
                f"{self.worker.config.lease_s}), got {lease}",
            )
        ticket, blocks, tokens = await call_worker(
            context,
            self.worker.reserve,
            spec.request_id,
            list(spec.prompt_token_ids),
            params,
            request.kv_transport,
            lease,
        )
        return pb.ReserveResponse(ticket=ticket, num_cached_blocks=blocks, num_cached_tokens=tokens)

    async def Decode(self, request: pb.DecodeRequest, context) -> AsyncIterator[pb.TokenChunk]:
        sink = Sink(asyncio.get_running_loop())
        rid = request.request_id
        await call_worker(context, self.worker.decode, rid, request.first_token, sink)
        async for chunk in stream_sink(sink, self.worker.abort, rid, context):
            yield chunk

    async def Generate(self, request: pb.RequestSpec, context) -> AsyncIterator[pb.TokenChunk]:
        sink = Sink(asyncio.get_running_loop())
        params = await call_worker(context, params_from_pb, request.params)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        await call_worker(context, self.worker.generate, rid, prompt, params, sink)
        async for chunk in stream_sink(sink, self.worker.abort, rid, context):
            yield chunk

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        found = await in_thread(self.worker.abort, request.request_id)
        return pb.AbortResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return health_response(self.worker.loop)

    async def Info(self, request, context) -> pb.InfoResponse:
        info = worker_info(self.worker.engine, self.worker.config, self.address)
        info.kv_transports.extend(sorted(self.worker.endpoints))
        return info

    async def Stats(self, request, context) -> pb.StatsResponse:
        return await call_worker(context, self.worker.stats)
