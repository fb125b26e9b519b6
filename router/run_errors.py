"""How a request's attempt on the workers fails (router/run.py): fall back to local
prefill, route again, or answer the client."""

from __future__ import annotations

import asyncio
import logging

import grpc

from router.cluster import WorkerRecord
from router.protocol import ApiError

logger = logging.getLogger("router.run")


class Fallback(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeDown(Exception):
    """The decode worker is unreachable (gRPC UNAVAILABLE); message: its details, for the
    log (clients get only the worker id: details name internal addresses)."""

    def __init__(self, worker_id: str, details: str | None) -> None:
        super().__init__(f"decode worker {worker_id} unreachable: {details}")
        self.worker_id = worker_id


SHIELD_ERRORS = (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)
FALLBACKS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "prefill_timeout",
    grpc.StatusCode.ABORTED: "transfer_failed",
    grpc.StatusCode.FAILED_PRECONDITION: "layout_mismatch",
    grpc.StatusCode.PERMISSION_DENIED: "ticket_refused",
}
"""Remote prefill failures that fall back to local prefill, by metric reason (any other
but INTERNAL, which is final, is ``prefill_failed``)."""


def worker_failed(worker: WorkerRecord, rid: str, exc: grpc.aio.AioRpcError) -> ApiError:
    """The 502 for a request a worker failed. INTERNAL is a failure of the request itself
    and names the engine's reason (its own sentence: no address, no exception text);
    anything else only points to the router's log."""
    details = exc.details() or ""
    logger.warning("request %s: %s worker %s failed: %s: %s", rid, worker.role, worker.worker_id, exc.code().name, details)  # fmt: skip
    if exc.code() == grpc.StatusCode.INTERNAL:
        why = ": " + details.split(": ", 1)[-1][:300]  # "request X failed on W: <reason>"
    else:
        why = "; the router's log has the details"
    return ApiError(502, f"{worker.role} worker {worker.worker_id} failed this request (request id {rid}){why}", "server_error")  # fmt: skip
