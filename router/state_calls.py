"""Cluster-state calls from the router's event loop: a state whose calls block on the
network (Redis) runs them on a small thread pool of its own, so Redis I/O never runs on
the asyncio loop thread; an in-memory state is called in place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from router.state.base import ClusterState

STATE_THREADS = 4
"""Concurrent Redis calls of one router (each routing decision is one round trip)."""


class StateCalls:
    def __init__(self, state: ClusterState, threads: int = STATE_THREADS) -> None:
        self.state = state
        blocking = getattr(state, "blocking", True)  # an unknown state may block
        self._pool = ThreadPoolExecutor(threads, "cluster-state") if blocking else None

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
