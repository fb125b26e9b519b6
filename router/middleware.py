"""ASGI middleware at the router's edge: a request body limit, answered 413 before parsing.

A body whose ``Content-Length`` is over the limit is refused without reading it; one sent
chunked is read up to the limit. Either way the rest of the body is read and discarded
(up to ``DRAIN_FACTOR`` x the limit) before the 413 goes out, because a client that sends
its whole body before reading (httpx, requests) would otherwise see the connection reset
instead of the answer. A client that sent ``Expect: 100-continue`` never gets the
``100 Continue``, so it sends nothing more.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

DRAIN_FACTOR = 4


class BodyLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = _int(headers.get(b"content-length"))
        if declared is not None and declared > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, declared if declared <= DRAIN_FACTOR * self.max_bytes else 0)
            return await self._refuse(send, declared)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await _drain(receive, DRAIN_FACTOR * self.max_bytes)
                return await self._refuse(send, None)
        return await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send, size: int | None) -> None:
        what = f"of {size} bytes" if size is not None else "sent chunked"
        message = (
            f"request body {what} exceeds the limit of {self.max_bytes} bytes (the server's "
            "--max-body-bytes); send a smaller request"
        )
        logger.warning("refused a request body %s (limit %d bytes)", what, self.max_bytes)
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": 413,
                }
            }  # fmt: skip
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _drain(receive, budget: int) -> None:
    """Read and drop up to ``budget`` bytes of the body still to come."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive):
    """The ASGI ``receive`` of the app: the buffered body once, then the client's own
    (so the app still sees ``http.disconnect``)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
