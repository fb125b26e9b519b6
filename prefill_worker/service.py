"""The prefill worker's own rpcs (Prefill, AttachTicket): thin adapters from worker.proto to
commands on its engine thread (a request's grammar compiled first, off that thread:
engine/worker/service.py). Abort, Health, Info and Stats are the shared layer's
(engine/worker/service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from engine.worker.commands import Abort
from engine.worker.convert import params_from_pb
from engine.worker.errors import WorkerError
from engine.worker.service import call_worker, compile_grammar
from kv_transfer import HandshakeError, KVSender, TicketRefused, TransferState
from kv_transfer.wire import ticket_from_pb
from prefill_worker.commands import AttachTicket, Prefill
from prefill_worker.worker import PrefillWorker
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


class PrefillService:
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    def methods(self) -> dict[str, Callable]:
        return {"Prefill": self.Prefill, "AttachTicket": self.AttachTicket}

    async def AttachTicket(self, request: pb.AttachTicketRequest, context) -> pb.AttachTicketResponse:  # fmt: skip
        rid, loop = request.request_id, self.worker.loop
        await call_worker(context, loop.check_serving)  # before connecting to D
        cached = request.num_cached_blocks
        sender = await call_worker(context, self._open, rid, [request.ticket], None, cached, thread=True)  # fmt: skip
        try:
            await asyncio.wrap_future(loop.submit(AttachTicket(rid, sender, request.num_cached_blocks)))  # fmt: skip
        except WorkerError as exc:  # the handler aborted the sender, or none ran
            sender.abort(str(exc))
            await context.abort(exc.code, str(exc))
        return pb.AttachTicketResponse()

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        spec, loop = request.request, self.worker.loop
        rid, prompt = spec.request_id, list(spec.prompt_token_ids)
        params = await call_worker(context, params_from_pb, spec.params)
        await call_worker(context, loop.check_serving)  # before connecting to D
        await compile_grammar(context, self.worker.engine.grammars, params)
        sender = None
        if not request.ticket_follows:
            tickets, cached = [request.ticket, *request.parts], request.num_cached_blocks
            sender = await call_worker(context, self._open, rid, tickets, len(prompt), cached, thread=True)  # fmt: skip
        aio = asyncio.get_running_loop()
        done: asyncio.Future = aio.create_future()

        def reply(result) -> None:  # the engine thread
            aio.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        cmd = Prefill(rid, prompt, params, sender, request.num_cached_blocks, reply)
        try:
            await asyncio.wrap_future(loop.submit(cmd))
            result = await done
        except WorkerError as exc:  # refused: the handler aborted the sender, or none ran
            if sender is not None:
                sender.abort(str(exc))
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:  # the router gave up (timeout or disconnect)
            with contextlib.suppress(WorkerError):  # a dead loop holds nothing to abort
                await asyncio.shield(asyncio.wrap_future(loop.submit(Abort(rid))))
            raise
        if isinstance(result, WorkerError):
            await context.abort(result.code, str(result))
        return result

    def _open(
        self, rid: str, tickets_pb: list, prompt_len: int | None, num_cached: int
    ) -> KVSender:
        """``tickets_pb``: the ticket, then its TP parts if any (the first part is the
        ticket); ``prompt_len`` None for AttachTicket (no TP parts there)."""
        name, ticket = self.worker.config.name, tickets_pb[0]
        tickets = [ticket_from_pb(t) for t in (tickets_pb[1:] or tickets_pb[:1])]
        try:
            sender = self.worker.open_sender(rid, tickets, prompt_len, num_cached)
        except TicketRefused as exc:  # checked before any connection is made
            logger.warning("prefill %s refused a ticket: %s", name, exc)
            raise WorkerError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        except HandshakeError as exc:
            logger.error("prefill %s refused by %s: %s", name, ticket.endpoint, exc)
            raise WorkerError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except OSError as exc:
            raise WorkerError(
                grpc.StatusCode.UNAVAILABLE, f"cannot reach KV endpoint {ticket.endpoint}: {exc}"
            ) from None
        except ValueError as exc:  # parts for another prefill TP size
            raise WorkerError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if sender.poll() is TransferState.FAILED:
            raise WorkerError(grpc.StatusCode.ABORTED, f"transfer refused: {sender.error}")
        return sender
