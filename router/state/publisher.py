"""A worker publishes itself into the shared Redis cluster state (``--redis-url``).

Both worker kinds use it (router/launch/worker_main.py starts it); routers in Redis mode
discover workers from what it writes (key layout: router/state/keys.py)::

    start():  register (one Lua script: layout check + record + epoch + alive TTL);
              a layout mismatch raises ``LayoutRefused`` (the worker exits non-zero)
    thread, every interval_s:
              down(): the engine loop died or stalled -> publish nothing (checked without
              the worker lock), so the alive TTL lapses and routers drop the worker
              snapshot(): the engine thread's latest load snapshot + the block-stored/
              -evicted hashes since the last tick (never waits for the engine) -> coalesced
              -> heartbeat (alive TTL + load) + prefix events
    Redis down: events keep coalescing into the publisher's copy of the cached set; each
              tick retries; back: register again and republish the whole set (reset)
    stop():   deregister this incarnation (clean shutdown)

All Redis I/O happens on the publisher thread: an engine step never waits on Redis.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engine.config import StateConfig
from router.state.base import WorkerLoad, WorkerRecord
from router.state.redis_link import RedisDown
from router.state.registration import WorkerRedis

logger = logging.getLogger(__name__)

Snapshot = Callable[[], tuple[WorkerLoad, list[int], list[int]]]
"""-> (load, block hashes stored since the last call, hashes evicted since the last call)."""
Down = Callable[[], str | None]
"""-> why the worker must not heartbeat (its engine loop died or stalled), or ``None``."""


class LayoutRefused(RuntimeError):
    """The cluster in Redis has another KV layout; the message names both values."""


@dataclass
class WorkerPublisher:
    """See the module docstring."""

    config: StateConfig
    """Where (``redis_url``, key prefix, credentials) and the heartbeat TTL; logs show
    ``state.url`` (redacted)."""
    record: WorkerRecord
    snapshot: Snapshot
    interval_s: float = 0.25
    """Load and events are published at most this often (coalesced in between)."""
    on_refused: Callable[[str], None] | None = None
    """Called (publisher thread) when a re-registration is refused; default: log."""
    down: Down | None = None
    """Heartbeat only while this returns ``None`` (the engine loop serves)."""
    _silenced: str | None = None
    _cached: OrderedDict[int, None] = field(default_factory=OrderedDict)
    _stored: list[int] = field(default_factory=list)
    _evicted: list[int] = field(default_factory=list)
    _registered: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.state = WorkerRedis(self.config)

    def start(self) -> None:
        """Register now (``LayoutRefused`` if refused; Redis down: retried), then publish."""
        self._tick()
        self._thread = threading.Thread(target=self._run, name="redis-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and deregister this incarnation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state.deregister(self.record.worker_id, self.record.epoch)
        logger.info("deregistered %s (epoch %d) from %s", self.record.worker_id, self.record.epoch, self.state.url)  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._tick()
            except LayoutRefused as exc:
                logger.error("redis %s refused %s: %s", self.state.url, self.record.worker_id, exc)
                if self.on_refused is not None:
                    self.on_refused(str(exc))
                return
            except Exception:
                logger.exception(
                    "publishing %s to %s failed", self.record.worker_id, self.state.url
                )

    def _tick(self) -> None:
        why = self.down() if self.down is not None else None
        if why is not None:
            if self._silenced is None:
                logger.error("%s stops heartbeating to %s: %s", self.record.worker_id, self.state.url, why)  # fmt: skip
            self._silenced = why
            return
        self._silenced = None
        load, stored, evicted = self.snapshot()
        self._coalesce(stored, evicted)
        try:
            if not self._registered:
                self._register(load)
            else:
                self._publish(load)
        except RedisDown:
            if self._registered:
                logger.warning("redis %s unreachable: %s keeps serving, retrying", self.state.url, self.record.worker_id)  # fmt: skip
            self._registered = False

    def _coalesce(self, stored: list[int], evicted: list[int]) -> None:
        for h in stored:
            self._cached[h] = None
            self._cached.move_to_end(h)
        for h in evicted:
            self._cached.pop(h, None)
        while len(self._cached) > self.record.num_blocks:
            self._cached.popitem(last=False)
        self._stored += stored
        self._evicted += evicted

    def _register(self, load: WorkerLoad) -> None:
        try:
            self.state.register(_with_load(self.record, load))
        except ValueError as exc:
            raise LayoutRefused(str(exc)) from None
        self.state.publish_blocks(self.record, list(self._cached), [], reset=True)
        self._stored, self._evicted = [], []
        self._registered = True
        logger.info(
            "%s worker %s registered in %s (epoch %d, ep_size %d, tp_size %d, %d KV blocks, %d cached)",
            self.record.role, self.record.worker_id, self.state.url, self.record.epoch,
            self.record.ep_size, self.record.tp_size, self.record.num_blocks, len(self._cached),
        )  # fmt: skip

    def _publish(self, load: WorkerLoad) -> None:
        if not self.state.publish_load(self.record.worker_id, self.record.epoch, load):
            logger.warning("redis %s lost %s's registration: registering again", self.state.url, self.record.worker_id)  # fmt: skip
            self._register(load)
            return
        if self._stored or self._evicted:
            self.state.publish_blocks(self.record, self._stored, self._evicted)
            self._stored, self._evicted = [], []


def _with_load(record: WorkerRecord, load: WorkerLoad) -> WorkerRecord:
    return replace(record, load=load)
