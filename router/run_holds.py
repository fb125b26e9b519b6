"""What one request may hold on the workers, and letting go of it (router/run.py).

Every attempt on a worker is tracked from the call that may start it until it is known
to be finished: ``to_abort`` lists it (an Abort is sent if the request ends first) and
``inflight`` counts it in the cluster state (routing reads it as load). The decode worker
that routing picked is counted by ``svc.route`` already: its first tracked attempt is
not counted twice.
"""

from __future__ import annotations

import asyncio
import logging

from proto import worker_pb2 as pb
from router.job import RouterService
from router.run_errors import SHIELD_ERRORS
from router.state.base import WorkerRecord

logger = logging.getLogger(__name__)


class Holds:
    """One request's attempts not known to be finished, and its in-flight counts."""

    def __init__(self, svc: RouterService) -> None:
        self.svc = svc
        self.to_abort: list[tuple[str, str, str]] = []
        """(worker id, role, request id) of every attempt not known to be finished."""
        self.inflight: list[str] = []
        self._reserved: str | None = None

    def routed(self, worker_id: str) -> None:
        """Routing picked ``worker_id`` and counted it in flight (``svc.route``)."""
        self.inflight.append(worker_id)
        self._reserved = worker_id

    async def track(self, worker: WorkerRecord, rid: str) -> None:
        """``rid`` may hold something on ``worker`` now (aborted unless it finishes)."""
        self.to_abort.append((worker.worker_id, worker.role, rid))
        if worker.worker_id == self._reserved:
            self._reserved = None  # counted since routing
            return
        self.inflight.append(worker.worker_id)
        await self.svc.io(self.svc.state.add_inflight, worker.worker_id, 1)

    def done(self, worker: WorkerRecord, rid: str) -> None:
        self.to_abort = [t for t in self.to_abort if (t[0], t[2]) != (worker.worker_id, rid)]

    async def abort_all(self) -> None:
        targets, self.to_abort = self.to_abort, []
        if targets:
            # Shielded: the targets are off the list, and the caller may be cancelled
            # mid-abort (RemotePrefill cancels its bind task when the prefill fails first).
            await asyncio.shield(self.svc.background(self._abort(targets)))

    async def _abort(self, targets: list[tuple[str, str, str]]) -> None:
        reg = self.svc.registry
        calls = []
        for worker_id, role, rid in targets:
            client = reg.clients.get(worker_id)
            if client is not None:
                calls.append(client.stub(role).Abort(pb.AbortRequest(request_id=rid), timeout=5.0))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, SHIELD_ERRORS):
                logger.warning("abort failed: %r", result)

    async def release(self) -> None:
        """The request ended: uncount it everywhere, abort what it may still hold."""
        done, self.inflight = self.inflight, []
        for worker_id in done:
            await self.svc.io(self.svc.state.add_inflight, worker_id, -1)
        if self.to_abort:
            # Shielded: the caller may be a cancelled task (client disconnect).
            self.svc.background(self.abort_all())
