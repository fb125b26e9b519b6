"""Routing state behind the ``ClusterState`` protocol: workers, their load, prefix index.

``MemoryClusterState`` is the embedded default (one router). ``RedisClusterState``
(router/state/redis.py, ``--redis-url``) shares the same protocol between several routers.

The prefix index maps each worker to the chained block hashes (engine/kv_cache/hashing)
of prompts it was sent, most recent last, capped at the worker's block count, corrected by
the block-stored and block-evicted events the worker reports in its Stats: an
approximation of what its prefix cache holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from engine.kv_cache.layout import KVLayoutSpec

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's last reported load (from its Stats)."""

    num_free_blocks: int = 0
    queued_prefill_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    queues: dict[str, int] = field(default_factory=dict)
    expert_tokens: list[int] = field(default_factory=list)
    """MoE: tokens routed to each expert since the worker started (empty for dense)."""
    prefill_tokens_per_s: float = 0.0
    """Measured prompt tokens per second (0.0 = not measured yet)."""


@dataclass(frozen=True)
class WorkerRecord:
    """A registered worker."""

    worker_id: str
    role: Role
    address: str
    layout: KVLayoutSpec
    num_blocks: int
    max_model_len: int
    epoch: int
    """Incarnation: a restarted worker registers again with a new epoch."""
    hostname: str = ""
    ep_size: int = 1
    """Expert-parallel ranks serving this worker (1 = no expert parallelism)."""
    kv_transports: tuple[str, ...] = ()
    healthy: bool = True
    last_heartbeat: float = field(default_factory=time.monotonic)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    inflight: int = 0
    """Requests this router has in flight on the worker (load not yet in Stats)."""


class ClusterState(Protocol):
    """Worker registry with heartbeats and epochs, load, and the prefix-block index."""

    def register(self, worker: WorkerRecord) -> None:
        """Add or replace a worker (a newer epoch replaces the old incarnation)."""

    def deregister(self, worker_id: str) -> None: ...

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        """Record a successful health check with the worker's load; marks it healthy."""

    def mark_unhealthy(self, worker_id: str, epoch: int | None = None) -> None:
        """Out of the candidate set until its next heartbeat; with ``epoch``, only if that
        incarnation is still the registered one (a restarted worker is left alone)."""

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        """Registered workers, optionally of one role and only the healthy ones."""

    def get(self, worker_id: str) -> WorkerRecord | None: ...

    def add_inflight(self, worker_id: str, delta: int) -> None:
        """Count requests this router routed to the worker and not yet finished."""

    def reserve(self, worker_id: str, seen_inflight: int) -> bool:
        """Atomically take one in-flight slot if the count is still ``seen_inflight``.

        Several routers that saw the same load cannot all pile onto one worker: the
        losers get ``False`` and route again on fresh state.
        """

    def health(self) -> dict:
        """Backend and reachability, for ``/health`` and metrics."""

    def record_prefix(self, worker_id: str, block_hashes: list[int]) -> None:
        """The worker now holds (or will hold) these prompt blocks."""

    def apply_block_events(self, worker_id: str, stored: list[int], evicted: list[int]) -> None:
        """The worker's own prefix-cache events (from its Stats): add stored, drop evicted."""

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        """How many leading blocks of ``block_hashes`` the worker is believed to hold."""


class MemoryClusterState:
    """In-process ``ClusterState``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self._prefix: dict[str, OrderedDict[int, None]] = {}

    def register(self, worker: WorkerRecord) -> None:
        with self._lock:
            old = self._workers.get(worker.worker_id)
            if old is None or old.epoch != worker.epoch:
                self._prefix[worker.worker_id] = OrderedDict()
            self._workers[worker.worker_id] = worker

    def deregister(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)
            self._prefix.pop(worker_id, None)

    def _update(self, worker_id: str, **changes) -> None:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is not None:
                self._workers[worker_id] = replace(w, **changes)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        self._update(worker_id, load=load, healthy=True, last_heartbeat=time.monotonic())

    def mark_unhealthy(self, worker_id: str, epoch: int | None = None) -> None:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is not None and epoch in (None, w.epoch):
                self._workers[worker_id] = replace(w, healthy=False)

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        with self._lock:
            return [
                w
                for w in self._workers.values()
                if (role is None or w.role == role) and (w.healthy or not healthy_only)
            ]

    def get(self, worker_id: str) -> WorkerRecord | None:
        with self._lock:
            return self._workers.get(worker_id)

    def add_inflight(self, worker_id: str, delta: int) -> None:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is not None:
                self._workers[worker_id] = replace(w, inflight=max(0, w.inflight + delta))

    def reserve(self, worker_id: str, seen_inflight: int) -> bool:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is None or w.inflight != seen_inflight:
                return False
            self._workers[worker_id] = replace(w, inflight=w.inflight + 1)
            return True

    def health(self) -> dict:
        return {"backend": "memory", "connected": True}

    def record_prefix(self, worker_id: str, block_hashes: list[int]) -> None:
        self.apply_block_events(worker_id, block_hashes, [])

    def apply_block_events(self, worker_id: str, stored: list[int], evicted: list[int]) -> None:
        with self._lock:
            index, w = self._prefix.get(worker_id), self._workers.get(worker_id)
            if index is None or w is None:
                return
            for h in stored:
                index[h] = None
                index.move_to_end(h)
            for h in evicted:
                index.pop(h, None)
            while len(index) > w.num_blocks:
                index.popitem(last=False)

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        with self._lock:
            index = self._prefix.get(worker_id, {})
            n = 0
            for h in block_hashes:
                if h not in index:
                    break
                n += 1
            return n
