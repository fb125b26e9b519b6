"""What the engine thread publishes for other threads to read: the load snapshot (Stats,
the Redis publisher) and the prefix-cache block events (their one consumer).

Readers never touch the engine: the engine thread builds a new frozen snapshot after every
iteration and every batch of commands, and readers take the latest reference.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from engine.engine import LLMEngine


@dataclass(frozen=True)
class RoleLoad:
    """A role worker's own tables, as counted on its engine thread."""

    queues: dict[str, int]
    """Queue name -> requests in it (names from the role's lifecycle docstring)."""
    queued_prefill_tokens: int
    """Prompt tokens not computed yet."""
    num_requests: int
    """Requests the worker tracks in total."""


@dataclass(frozen=True)
class LoadSnapshot:
    """One consistent view of a worker's load (proto ``StatsResponse``)."""

    num_blocks: int
    num_free_blocks: int
    load: RoleLoad
    prefill_tokens_per_s: float = 0.0
    expert_tokens: tuple[int, ...] = ()
    """MoE: tokens routed to each expert since the start (empty for dense models)."""
    ep_size: int = 0
    """MoE: ranks the experts are spread over (0 for dense models)."""
    has_work: bool = False
    """Requests are waiting or running in the engine."""


def take_snapshot(engine: LLMEngine, load: RoleLoad, moe: bool) -> LoadSnapshot:
    """Engine thread only."""
    expert = engine.expert_load() if moe else None
    return LoadSnapshot(
        num_blocks=engine.layout.num_blocks,
        num_free_blocks=engine.num_free_blocks,
        load=load,
        prefill_tokens_per_s=engine.prefill_rate.tokens_per_s,
        expert_tokens=expert.tokens_per_expert if expert else (),
        ep_size=len(expert.tokens_per_rank) if expert else 0,
        has_work=engine.has_unfinished_requests(),
    )


@dataclass
class BlockEvents:
    """Block hashes the prefix cache stored and evicted, handed from the engine thread to
    their one consumer: the Redis publisher when there is one, else the ``Stats`` caller."""

    publisher: bool = False
    """A publisher consumes them (``Stats`` then hands out none)."""
    _stored: list[int] = field(default_factory=list)
    _evicted: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, stored: list[int], evicted: list[int]) -> None:
        if stored or evicted:
            with self._lock:
                self._stored += stored
                self._evicted += evicted

    def take(self) -> tuple[list[int], list[int]]:
        """Everything since the last ``take`` (stored, evicted)."""
        with self._lock:
            out = self._stored, self._evicted
            self._stored, self._evicted = [], []
        return out
