"""The decode worker's own rpcs (Reserve, Decode, Generate): thin adapters from
worker.proto to commands on its engine thread. Abort, Health, Info and Stats are the
shared layer's (engine/worker/service.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from decode_worker.commands import Decode, Generate, Reserve
from decode_worker.worker import DecodeWorker
from engine.config import LEASE_S
from engine.worker.convert import params_from_pb
from engine.worker.service import abort_of, ask, call_worker, stream_sink
from engine.worker.sink import Sink
from proto import worker_pb2 as pb


class DecodeService:
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    def methods(self) -> dict[str, Callable]:
        return {"Reserve": self.Reserve, "Decode": self.Decode, "Generate": self.Generate}

    async def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveResponse:
        spec = request.request
        params = await call_worker(context, params_from_pb, spec.params)
        prompt, lease = list(spec.prompt_token_ids), request.lease_s or LEASE_S
        tp = request.prefill_tp_size or 1
        cmd = Reserve(spec.request_id, prompt, params, request.kv_transport, lease, tp)
        ticket, blocks, tokens, parts = await ask(context, self.worker.loop, cmd)
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
        await ask(context, self.worker.loop, Generate(rid, prompt, params, sink))
        async for chunk in stream_sink(sink, abort_of(self.worker.loop, rid), context):
            yield chunk
