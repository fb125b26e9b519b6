"""``MemoryClusterState``: the embedded cluster state of one router (no ``--redis-url``).

The prefix index maps each worker to the chained block hashes (engine/kv_cache/hashing)
of prompts it was sent, most recent last, capped at the worker's block count, corrected by
the block-stored and block-evicted events the worker reports in its Stats: an
approximation of what its prefix cache holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import replace

from router.state.base import ClusterView, Role, WorkerLoad, WorkerRecord


class MemoryClusterState:
    """In-process ``ClusterState``; thread-safe."""

    blocking = False

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

    def view(self, block_hashes: list[int]) -> ClusterView:
        records = tuple(self.workers(healthy_only=False))
        prefix = {
            w.worker_id: self.match_prefix(w.worker_id, block_hashes)
            for w in records
            if w.role == "decode"
        }
        return ClusterView(records, tuple(block_hashes), prefix)
