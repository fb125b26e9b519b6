"""Routing state behind the ``ClusterState`` protocol: workers, their load, prefix index.

``MemoryClusterState`` (router/state/memory.py) is the embedded default (one router).
``RedisClusterState`` (router/state/redis.py, ``--redis-url``) shares the same protocol
between several routers. A routing decision reads a ``ClusterView``: the workers with
their load and in-flight counts and the request's prefix matches, taken in one go (for
Redis, one round trip).

The prefix index maps each worker to the chained block hashes (engine/kv_cache/hashing)
of prompts it was sent, most recent last, capped at the worker's block count, corrected by
the block-stored and block-evicted events the worker reports in its Stats: an
approximation of what its prefix cache holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from engine.kv_cache.spec import KVLayoutSpec
from engine.kv_cache.spec_pb import spec_from_pb

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
    tp_size: int = 1
    """Tensor-parallel ranks serving this worker (1 = no tensor parallelism)."""
    kv_transports: tuple[str, ...] = ()
    healthy: bool = True
    last_heartbeat: float = field(default_factory=time.monotonic)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    inflight: int = 0
    """Requests this router has in flight on the worker (load not yet in Stats)."""


class ClusterReader(Protocol):
    """What a routing policy reads (a ``ClusterView``, or a state itself)."""

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        """Registered workers, optionally of one role and only the healthy ones."""

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        """How many leading blocks of ``block_hashes`` the worker is believed to hold."""

    def view(self, block_hashes: list[int]) -> ClusterView:
        """Everything one routing decision reads, at once (Redis: one round trip)."""

    blocking: bool
    """Its calls wait on the network: async callers run them off the event loop."""


@dataclass(frozen=True)
class ClusterView:
    """The state one routing decision needs, read at once: every registered worker (load,
    in-flight count, health) and how much of this request's prompt each decode worker
    holds. A ``ClusterReader`` for ``block_hashes`` only."""

    records: tuple[WorkerRecord, ...]
    block_hashes: tuple[int, ...]
    prefix: Mapping[str, int] = field(default_factory=dict)
    """Decode worker id -> leading blocks of ``block_hashes`` it is believed to hold."""

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        return [
            w
            for w in self.records
            if (role is None or w.role == role) and (w.healthy or not healthy_only)
        ]

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        if tuple(block_hashes) != self.block_hashes:
            raise ValueError("a ClusterView answers only for the block hashes it was read for")
        return self.prefix.get(worker_id, 0)


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

    def view(self, block_hashes: list[int]) -> ClusterView:
        """Everything one routing decision reads, at once (Redis: one round trip)."""

    blocking: bool
    """Its calls wait on the network: async callers run them off the event loop."""


def record_from_info(info, address: str = "") -> WorkerRecord:
    """A worker's ``InfoResponse`` as its registry record."""
    return WorkerRecord(
        worker_id=info.worker_id,
        role=info.role,
        address=info.address or address,
        layout=spec_from_pb(info.layout),
        num_blocks=info.num_blocks,
        max_model_len=info.max_model_len,
        epoch=info.epoch,
        hostname=info.hostname,
        ep_size=info.ep_size or 1,
        tp_size=info.tp_size or 1,
        kv_transports=tuple(info.kv_transports),
    )


def load_from_stats(stats) -> WorkerLoad:
    """A worker's ``StatsResponse`` as the load it publishes."""
    queues = dict(stats.queues)
    return WorkerLoad(
        num_free_blocks=stats.num_free_blocks,
        queued_prefill_tokens=stats.queued_prefill_tokens,
        num_running=queues.get("running", 0),
        num_waiting=queues.get("waiting", 0),
        queues=queues,
        expert_tokens=list(stats.expert_tokens),
        prefill_tokens_per_s=stats.prefill_tokens_per_s,
    )
