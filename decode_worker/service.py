"""The decode worker's own rpcs (Reserve, Decode, Generate): thin adapters from
worker.proto to commands on its engine thread (a request's grammar compiled first, off
that thread: engine/worker/service.py). Abort, Health, Info and Stats are the shared
layer's (engine/worker/service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable

import grpc

from decode_worker.commands import Decode, Generate, Reserve
from decode_worker.worker import DecodeWorker
from engine.model_spec import ModelSpec
from engine.parallel.tp import check_tp
from engine.worker.convert import params_from_pb
from engine.worker.errors import WorkerError
from engine.worker.service import abort_of, ask, call_worker, compile_grammar, stream_sink
from engine.worker.sink import Sink
from proto import worker_pb2 as pb

MAX_LEASE_S = 3600.0
"""Longest lease a Reserve may ask for: the blocks of a transfer that never comes are
free again by then (an infinite lease would hold them for good)."""


class DecodeService:
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    def methods(self) -> dict[str, Callable]:
        return {"Reserve": self.Reserve, "Decode": self.Decode, "Generate": self.Generate}

    async def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveResponse:
        spec = request.request
        params = await call_worker(context, params_from_pb, spec.params)
        prompt, lease = list(spec.prompt_token_ids), request.lease_s or self.worker.config.lease_s
        if not (math.isfinite(lease) and 0 < lease <= MAX_LEASE_S):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lease_s must be in (0, {MAX_LEASE_S}] seconds (0 = this worker's default "
                f"{self.worker.config.lease_s}), got {lease}",
            )
        tp = request.prefill_tp_size or 1
        await call_worker(context, _check_prefill_tp, self.worker.engine.spec, tp)
        await compile_grammar(context, self.worker.engine.grammars, params)
        cmd = Reserve(spec.request_id, prompt, params, request.kv_transport, lease, tp)
        try:
            ticket, blocks, tokens, parts = await ask(context, self.worker.loop, cmd)
        except asyncio.CancelledError:  # the router gave up: free what it may have reserved
            with contextlib.suppress(WorkerError):  # a dead loop holds nothing to abort
                await asyncio.shield(abort_of(self.worker.loop, spec.request_id)())
            raise
        return pb.ReserveResponse(
            ticket=ticket, num_cached_blocks=blocks, num_cached_tokens=tokens, parts=parts
        )

    async def Decode(self, request: pb.DecodeRequest, context) -> AsyncIterator[pb.TokenChunk]:
        sink = Sink(asyncio.get_running_loop())
        rid = request.request_id
        await ask(context, self.worker.loop, Decode(rid, request.first_token, sink))
        async for chunk in stream_sink(sink, abort_of(self.worker.loop, rid), context):
            yield chunk

    async def Generate(self, request: pb.RequestSpec, context) -> AsyncIterator[pb.TokenChunk]:
        sink = Sink(asyncio.get_running_loop())
        params = await call_worker(context, params_from_pb, request.params)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        await compile_grammar(context, self.worker.engine.grammars, params)
        await ask(context, self.worker.loop, Generate(rid, prompt, params, sink))
        async for chunk in stream_sink(sink, abort_of(self.worker.loop, rid), context):
            yield chunk


def _check_prefill_tp(spec: ModelSpec, tp: int) -> None:
    """A prefill TP size this model cannot be split over is refused before any part is
    planned (planning walks every prefill rank: an absurd size would stall the engine)."""
    try:
        check_tp(spec, tp)
    except ValueError as exc:
        raise ValueError(f"prefill_tp_size={tp} does not fit this model: {exc}") from None
