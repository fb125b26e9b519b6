"""How a request's attempt on the workers fails (router/run.py, router/remote.py): fall
back to local prefill, continue on D after the first token, route again, or answer the
client."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc

from router.policy import RouteReason
from router.protocol import ApiError
from router.state.base import WorkerRecord

logger = logging.getLogger("router.run")


class Fallback(Exception):
    """Remote prefill failed before the first token: prefill on the decode worker."""

    def __init__(self, reason: RouteReason) -> None:
        super().__init__(reason)
        self.reason = reason


class TransferLost(Exception):
    """After the first token: the decode worker will not get the prompt's KV (reservation
    refused, ticket refused, transfer failed); it continues the request itself."""

    def __init__(self, message: str, reason: RouteReason = RouteReason.TRANSFER_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


class DecodeDown(Exception):
    """The decode worker is unreachable (gRPC UNAVAILABLE); message: its details, for the
    log (clients get them through :func:`public_reason`)."""

    def __init__(self, worker_id: str, details: str | None) -> None:
        super().__init__(f"decode worker {worker_id} unreachable: {details}")
        self.worker_id, self.details = worker_id, details


SHIELD_ERRORS = (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)
FALLBACKS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: RouteReason.PREFILL_TIMEOUT,
    grpc.StatusCode.ABORTED: RouteReason.TRANSFER_FAILED,
    grpc.StatusCode.FAILED_PRECONDITION: RouteReason.LAYOUT_MISMATCH,
    grpc.StatusCode.PERMISSION_DENIED: RouteReason.TICKET_REFUSED,
}
"""Remote prefill failures that fall back to local prefill, by metric reason (any other
but INTERNAL, which is final, is ``prefill_failed``)."""

_ADDRESS = re.compile(r"(ipv[46]:)?(\[[0-9a-fA-F:.]+\]|\b\d{1,3}(\.\d{1,3}){3})(:\d{1,5})?")


def public_reason(details: str | None, limit: int = 400) -> str:
    """A worker's failure reason as a client may see it: internal addresses removed, bounded.

    Workers describe what failed (``EP rank 1 (pid 4242) died``, ``KV transfer failed``);
    the client needs that to know whether retrying helps, but not the cluster's addresses."""
    text = _ADDRESS.sub("<internal>", details or "no details")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def worker_failed(worker: WorkerRecord, rid: str, exc: grpc.aio.AioRpcError) -> ApiError:
    """The 502 for a request a worker failed, naming the worker's reason (addresses
    removed); the full details go to the router's log."""
    details = exc.details() or ""
    logger.warning("request %s: %s worker %s failed: %s: %s", rid, worker.role, worker.worker_id, exc.code().name, details)  # fmt: skip
    return ApiError(502, f"{worker.role} worker {worker.worker_id} failed this request (request id {rid}): {public_reason(details)}", "server_error")  # fmt: skip
