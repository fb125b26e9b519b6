"""Answering a job over HTTP: one JSON body, or an SSE stream, bounded at both ends.

deadline    the whole request is under ``request_timeout_s`` (504, aborted)
first       until the first output, the client's connection is watched: a client
            that goes away (streaming or not) aborts the request on the workers
stream      a client that accepts no data for ``stream_stall_timeout_s`` (it stopped
            reading) is dropped and its request aborted; so is one that disconnects
close       the outputs are closed on every path, which releases the in-flight slot
            and aborts on the workers whatever did not finish (router/service.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse

from router.job import Output
from router.protocol import ApiError

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a request waiting for its worker checks that its client is still there."""

T = TypeVar("T")


async def until(outs: AsyncGenerator[Output], timeout_s: float) -> AsyncIterator[Output]:
    """``outs`` under an overall deadline; the generator is closed (aborting) on expiry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                out = await asyncio.wait_for(outs.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(504, f"request timed out after {timeout_s:g}s", "timeout") from None
            yield out
    finally:
        await outs.aclose()


async def or_disconnect(make: Callable[[], Awaitable[T]], request: Request) -> T:
    """Await ``make()``; a client that goes away meanwhile cancels it (so the request is
    aborted on the workers) and gets 499."""
    task = asyncio.ensure_future(make())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not done and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ApiError(499, "client disconnected", "client_closed_request")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


async def collect(outs: AsyncIterator[Output], request: Request) -> list[Output]:
    async def gather() -> list[Output]:
        return [out async for out in outs]

    return await or_disconnect(gather, request)


async def first_output(outs: AsyncIterator[Output], request: Request) -> Output | None:
    """The first output (its errors keep their HTTP status), or None for an empty run."""

    async def first() -> Output | None:
        try:
            return await outs.__anext__()
        except StopAsyncIteration:
            return None

    return await or_disconnect(first, request)


async def chain(first, rest: AsyncIterator) -> AsyncIterator:
    """``first`` (an ``(index, Output)`` already awaited), then the rest of the stream."""
    try:
        if first is not None:
            yield first
        async for out in rest:
            yield out
    finally:
        await rest.aclose()


class _Stalled(Exception):
    pass


class EventStream(StreamingResponse):
    """SSE whose client must keep reading: a send that waits longer than ``stall_s`` (the
    socket's buffers are full) ends the stream. ``upstream`` is closed however the
    response ends, even when the client left before the first byte was sent."""

    def __init__(
        self,
        content: AsyncGenerator[str],
        upstream: AsyncGenerator[Output],
        stall_s: float,
        request_id: str,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.upstream, self.stall_s, self.request_id = upstream, stall_s, request_id

    async def stream_response(self, send) -> None:
        async def bounded(message) -> None:
            try:
                async with asyncio.timeout(self.stall_s):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().stream_response(bounded)
        except _Stalled:
            # The response stays incomplete: the server closes the connection.
            logger.warning(
                "request %s: the client accepted no data for %gs; aborting",
                self.request_id, self.stall_s,
            )  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.upstream.aclose()
