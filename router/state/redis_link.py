"""One Redis connection of the cluster state with its outage handling: a call that cannot
reach Redis raises ``RedisDown`` (its caller falls back to what it knows), and Redis is
retried every ``retry_s``; when it answers again ``on_back`` runs first (re-register:
a restarted Redis is empty)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from engine.config import RedisOptions
from router.state import scripts as lua
from router.state.redis_conn import connect, redact_url

logger = logging.getLogger(__name__)


class RedisDown(RuntimeError):
    pass


class RedisLink:
    def __init__(
        self,
        url: str,
        options: RedisOptions | None,
        retry_s: float,
        on_back: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = redact_url(url)
        """For display (logs, ``/health``): the password, if the URL has one, is ``***``."""
        self.r = connect(
            url, options, decode_responses=True, socket_connect_timeout=0.25, socket_timeout=0.5
        )
        self.retry_s, self.on_back = retry_s, on_back
        self.connected = True
        self.errors = 0
        self._retry_at = 0.0
        self.script = {name: self.r.register_script(getattr(lua, name)) for name in lua.NAMES}

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` against Redis; raise ``RedisDown`` (and remember it) when unreachable."""
        if not self.connected and time.monotonic() < self._retry_at:
            raise RedisDown(self.url)
        try:
            if not self.connected:
                self.r.ping()
                self.connected = True
                logger.info("redis %s is back: resyncing", self.url)
                self.on_back()
            return fn()
        except redis.RedisError as exc:
            self.errors += 1
            if self.connected:
                logger.warning("redis %s unreachable (%r): serving on the last known state", self.url, exc)  # fmt: skip
            self.connected = False
            self._retry_at = time.monotonic() + self.retry_s
            raise RedisDown(self.url) from exc

    def attempt(self, fn: Callable[[], Any]) -> None:
        """``call`` for a write that may be lost while Redis is down."""
        try:
            self.call(fn)
        except RedisDown:
            pass
