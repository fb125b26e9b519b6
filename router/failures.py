"""How one attempt of a request can go wrong on the workers (router/run.py, router/remote.py),
and what a client may see of a worker's reason."""

from __future__ import annotations

import re

from router.policy import RouteReason


class Fallback(Exception):
    """Remote prefill failed before the first token: prefill on the decode worker instead."""

    def __init__(self, reason: RouteReason) -> None:
        super().__init__(reason)
        self.reason = reason


class TransferLost(Exception):
    """After the first token: the decode worker will not get the prompt's KV (reservation
    refused, ticket refused, transfer failed); it continues the request itself."""


class DecodeDown(Exception):
    """The decode worker is unreachable (gRPC UNAVAILABLE); message: its details, for the
    log (clients get them through :func:`public_reason`)."""

    def __init__(self, worker_id: str, details: str | None) -> None:
        super().__init__(f"decode worker {worker_id} unreachable: {details}")
        self.worker_id, self.details = worker_id, details


_ADDRESS = re.compile(r"(ipv[46]:)?(\[[0-9a-fA-F:.]+\]|\b\d{1,3}(\.\d{1,3}){3})(:\d{1,5})?")


def public_reason(details: str | None, limit: int = 400) -> str:
    """A worker's failure reason as a client may see it: internal addresses removed, bounded.

    Workers describe what failed (``EP rank 1 (pid 4242) died``, ``KV transfer failed``);
    the client needs that to know whether retrying helps, but not the cluster's addresses."""
    text = _ADDRESS.sub("<internal>", details or "no details")
    return text if len(text) <= limit else text[: limit - 3] + "..."
