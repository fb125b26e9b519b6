"""Hands a request's output from the engine thread to the one asyncio consumer that
streams it (a gRPC ``Decode`` / ``Generate`` call)."""

from __future__ import annotations

import asyncio
from typing import Any


class Sink:
    """Items from the engine thread to one asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        """Thread-safe; ``item`` may be an exception, which the consumer raises."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Any:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
