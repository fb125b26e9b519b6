"""gRPC servicer of the prefill worker: thin adapters from worker.proto to PrefillWorker."""

from __future__ import annotations

import asyncio
import logging

import grpc

from decode_worker.service import call_worker, in_thread
from engine.worker.convert import params_from_pb
from engine.worker.info import health_response, worker_info
from engine.worker.loop import WorkerError
from kv_transfer import HandshakeError, TicketRefused, TransferState
from kv_transfer.wire import ticket_from_pb
from prefill_worker.worker import PrefillWorker
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc

logger = logging.getLogger(__name__)


class PrefillServicer(rpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker, address: str) -> None:
        self.worker = worker
        self.address = address

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        spec = request.request
        params = await call_worker(context, params_from_pb, spec.params)
        if self.worker.config.fault_delay_s:
            await asyncio.sleep(self.worker.config.fault_delay_s)
        await call_worker(context, self.worker.loop.check_serving)  # before connecting to D
        sender = await call_worker(context, self._open, request.ticket)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def reply(result) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        rid, prompt = spec.request_id, list(spec.prompt_token_ids)
        args = (rid, prompt, params, sender, request.num_cached_blocks, reply)
        await call_worker(context, self.worker.submit, *args)
        try:
            result = await done
        except asyncio.CancelledError:  # the router gave up (timeout or disconnect)
            await asyncio.shield(in_thread(self.worker.abort, rid))
            raise
        if isinstance(result, WorkerError):
            await context.abort(result.code, str(result))
        return result

    def _open(self, ticket: pb.TransferTicket):
        client = self.worker.client(ticket.backend)
        try:
            sender = client.open(ticket_from_pb(ticket))
        except TicketRefused as exc:  # checked before any connection is made
            logger.warning("prefill %s refused a ticket: %s", self.worker.config.name, exc)
            raise WorkerError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        except HandshakeError as exc:
            logger.error(
                "prefill %s refused by %s: %s", self.worker.config.name, ticket.endpoint, exc
            )
            raise WorkerError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except OSError as exc:
            raise WorkerError(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach KV endpoint {ticket.endpoint}: {exc}"
            ) from None
        if sender.poll() is TransferState.FAILED:
            raise WorkerError(grpc.StatusCode.ABORTED, f"transfer refused: {sender.error}")
        return sender

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        found = await in_thread(self.worker.abort, request.request_id)
        return pb.AbortResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return health_response(self.worker.loop)

    async def Info(self, request, context) -> pb.InfoResponse:
        return worker_info(self.worker.engine, self.worker.config, self.address)

    async def Stats(self, request, context) -> pb.StatsResponse:
        return await call_worker(context, self.worker.stats)
