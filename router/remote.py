"""The disaggregated hops of one attempt, from the router: a reservation on D, the prefill on
P, the ticket between them and the first token.

    overlap (RouterConfig.reserve_mode, the default):
        D.Reserve ──────────────> P.AttachTicket ──┐   "bind" (a task)
        P.Prefill(ticket follows) ──── computes ───┴──> first token  (returned at once)
    serial (also whenever either side is a TP group: P opens every part at once):
        D.Reserve ──> P.Prefill(ticket, parts) ──> first token

    bind fails before the first token  -> abort P and D, Fallback (prefill on D); if P
                                          says the prefill already ended, its reply decides
    bind fails after it                -> TransferLost: D continues from the first token
    prefill fails                      -> abort P and D, Fallback (or 400 for bad input)

P answers with the first token as soon as it samples it; the KV may still be on its way,
which D's Decode call waits for (router/run.py). Hop latencies go to
``pdserve_disagg_hop_seconds``: ``reserve`` here, ``prefill_queue`` and
``prefill_compute`` from P's reply (router/run.py adds D's ``transfer_tail`` and
``decode_admission``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import grpc

from proto import worker_pb2 as pb
from router.job import Job, RouterService
from router.policy import RouteDecision, RouteReason
from router.run_errors import FALLBACKS, SHIELD_ERRORS, DecodeDown, Fallback, TransferLost
from router.state.base import WorkerRecord


class Run(Protocol):
    """What a remote prefill needs of its request's run (router/run.py ``RequestRun``)."""

    svc: RouterService
    job: Job
    spec: pb.RequestSpec
    to_abort: list[tuple[str, str, str]]

    async def track(self, worker: WorkerRecord, rid: str) -> None: ...

    def done(self, worker: WorkerRecord, rid: str) -> None: ...

    async def abort_all(self) -> None: ...

    def raise_bad_input(self, exc: grpc.aio.AioRpcError) -> None: ...

    async def prefill_failed(self, decision: RouteDecision, exc: grpc.aio.AioRpcError) -> None: ...


async def _cancelled(task: asyncio.Future) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


def _prefill_ended(exc: BaseException) -> bool:
    """P refused the ticket because the prefill already ended (it failed first)."""
    cause = exc.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.NOT_FOUND


class RemotePrefill:
    """One attempt's remote prefill (see the module docstring)."""

    def __init__(self, run: Run, decision: RouteDecision) -> None:
        self.run, self.svc = run, run.svc
        self.decision, self.d, self.p = decision, decision.decode, decision.prefill
        self.rid = run.job.request_id
        self.transport = self.svc.transport(self.p, self.d)
        self._bind: asyncio.Future | None = None

    async def first_token(self) -> pb.PrefillResponse:
        """P's reply; raises Fallback, DecodeDown or ApiError (everything aborted then)."""
        await self.run.track(self.d, self.rid)
        await self.run.track(self.p, self.rid)
        if self.svc.config.reserve_mode == "serial" or max(self.p.tp_size, self.d.tp_size) > 1:
            # A TP group on either side reserves first: P needs every part's ticket to
            # open them on its ranks (AttachTicket carries one ticket).
            # Shielded: a Reserve is never cancelled (its reply is the only sign of a
            # reservation that an earlier Abort may have missed: see _reserve).
            res = await asyncio.shield(self._reserving())
            self._bind = asyncio.get_running_loop().create_future()
            self._bind.set_result(res)
            pre = await self._prefill(res)
        else:
            pre = await self._overlapped()
        hops = self.svc.metrics.hops
        hops.labels(hop="prefill_queue").observe(pre.queue_seconds)
        hops.labels(hop="prefill_compute").observe(pre.compute_seconds)
        return pre

    async def _overlapped(self) -> pb.PrefillResponse:
        reserve = self._reserving()
        self._bind = bind = asyncio.ensure_future(self._attach_after(reserve))
        prefill = asyncio.ensure_future(self._prefill(None))
        await asyncio.wait({prefill, bind}, return_when=asyncio.FIRST_COMPLETED)
        if bind.done() and bind.exception() is not None:  # before the first token
            if _prefill_ended(bind.exception()):
                return await prefill  # P's own reply says why (INTERNAL: final, no fallback)
            await _cancelled(prefill)
            raise bind.exception()
        try:
            pre = await prefill
        except BaseException:
            await _cancelled(bind)
            raise
        # D must be known reachable before the first token goes out: once the client has
        # it, a D found down could no longer be routed around. Reserve is the short hop
        # (it usually ends before the prefill), so this rarely waits.
        try:
            await asyncio.shield(reserve)
        except Fallback:
            pass  # D is up but refused: kv_bound reports it, D continues locally
        except DecodeDown:
            await _cancelled(bind)
            raise
        return pre

    async def kv_bound(self) -> None:
        """Wait until P holds the ticket; TransferLost if it never will (DecodeDown: D is
        unreachable)."""
        try:
            await self._bind
        except Fallback as exc:
            raise TransferLost(
                f"no KV for request {self.rid}: {exc.reason.value}", exc.reason
            ) from exc
        self.run.done(self.p, self.rid)  # P holds the ticket: D's abort now reaches it too

    async def _attach_after(self, reserve: asyncio.Future) -> pb.ReserveResponse:
        res = await asyncio.shield(reserve)  # cancelling the bind leaves the Reserve on
        await self._attach(res)
        return res

    def _reserving(self) -> asyncio.Task:
        """The Reserve call as a task of the router's (kept to its end, never cancelled)."""
        return self.svc.background(self._reserve())

    def _aborted(self) -> bool:
        """The attempt already aborted D (it failed, or the client left): every abort takes
        D's entry off the run's list."""
        return (self.d.worker_id, self.rid) not in {(w, r) for w, _, r in self.run.to_abort}

    async def _abort_late(self) -> None:
        """D reserved after the attempt's Abort went out (that Abort may have reached D
        first, or been lost with its caller): free the reservation now, not at its lease."""
        client = self.svc.registry.clients.get(self.d.worker_id)
        if client is not None:
            with contextlib.suppress(*SHIELD_ERRORS):
                await client.stub(self.d.role).Abort(pb.AbortRequest(request_id=self.rid), timeout=5.0)  # fmt: skip

    async def _reserve(self) -> pb.ReserveResponse:
        cfg, d = self.svc.config, self.d
        req = pb.ReserveRequest(
            request=self.run.spec, kv_transport=self.transport, lease_s=cfg.lease_s,
            prefill_tp_size=self.p.tp_size,  # a TP group on either side: D plans its parts
        )  # fmt: skip
        t0 = time.monotonic()
        try:
            res = await self.svc.registry.client(d).decode.Reserve(req, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if not self._aborted():  # else the attempt is over: the list holds its fallback's
                await self.run.abort_all()
            self.run.raise_bad_input(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                await self.svc.io(self.svc.state.mark_unhealthy, d.worker_id, d.epoch)
                raise DecodeDown(d.worker_id, exc.details()) from None
            raise Fallback(RouteReason.RESERVE_FAILED) from exc
        self.svc.metrics.hops.labels(hop="reserve").observe(time.monotonic() - t0)
        if self._aborted():
            await self._abort_late()
        return res

    async def _attach(self, res: pb.ReserveResponse) -> None:
        req = pb.AttachTicketRequest(
            request_id=self.rid, ticket=res.ticket, num_cached_blocks=res.num_cached_blocks
        )
        client = self.svc.registry.client(self.p)
        try:
            await client.prefill.AttachTicket(req, timeout=self.svc.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self.run.abort_all()
            raise Fallback(FALLBACKS.get(exc.code(), RouteReason.PREFILL_FAILED)) from exc

    async def _prefill(self, res: pb.ReserveResponse | None) -> pb.PrefillResponse:
        if res is None:
            req = pb.PrefillRequest(request=self.run.spec, ticket_follows=True)
        else:
            req = pb.PrefillRequest(request=self.run.spec, ticket=res.ticket, num_cached_blocks=res.num_cached_blocks, parts=res.parts)  # fmt: skip
        client = self.svc.registry.client(self.p)
        try:
            return await client.prefill.Prefill(req, timeout=self.svc.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self.run.prefill_failed(self.decision, exc)
            raise  # prefill_failed always raises
