"""``ParallelState``: one rank's place in a model replica spread over several ranks.

The one object the engine, the loader and the workers are handed about parallelism. A
replica is either tensor-parallel (``tp_size`` ranks: every layer split across them,
engine/parallel/tp.py) or expert-parallel (``ep_size`` ranks: MoE experts split, attention
data-parallel, engine/parallel/ep.py); ``tp_size x ep_size`` grids are not supported.
Rank 0 leads: it schedules, broadcasts each step and samples.

    group       device collectives: TP all-reduce / gather, EP all_to_all (NCCL on CUDA,
                gloo on CPU)
    cpu_group   gloo: the leader's per-step broadcast (CPU bytes); ``None`` = ``group``
    channel     the side channel between the leader and each follower, outside the step
                lockstep (engine/parallel/channel.py): leader a ``RankHub``, follower a
                ``RankLink``; ``None`` where nothing uses it (EP)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from engine.parallel.ep import ExpertParallelGroup


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    tp_size: int = 1
    ep_size: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    rank_pids: tuple[int, ...] = ()
    """Process id of every rank (one host), when the launcher knows them: a failed
    collective then names the rank that died (engine/parallel/health.py)."""
    channel: Any = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got {self.tp_size}/{self.ep_size}")
        if self.tp_size > 1 and self.ep_size > 1:
            raise ValueError(
                f"tp_size={self.tp_size} with ep_size={self.ep_size}: a replica is either "
                "tensor- or expert-parallel; for an MoE model use --tp-size N (experts "
                "split inside each expert) or --ep-size N (experts spread over ranks)"
            )
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} out of range for a group of {self.size}")

    @property
    def size(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def kind(self) -> str:
        """``tp``, ``ep`` or ``single``: how this replica is split."""
        return "tp" if self.tp_size > 1 else "ep" if self.ep_size > 1 else "single"

    @property
    def control_group(self) -> dist.ProcessGroup | None:
        return self.cpu_group if self.cpu_group is not None else self.group

    @property
    def ep(self) -> ExpertParallelGroup | None:
        """The expert-parallel view (dispatch/combine take it); ``None`` without EP."""
        if self.ep_size == 1:
            return None
        return ExpertParallelGroup(
            self.rank, self.ep_size, self.group, self.cpu_group, self.rank_pids
        )

    @classmethod
    def from_ep(cls, ep: ExpertParallelGroup) -> ParallelState:
        return cls(ep.rank, 1, ep.size, ep.group, ep.control_group, ep.rank_pids)


SINGLE = ParallelState()
"""One rank: no collectives at all."""


def as_parallel(value: ParallelState | ExpertParallelGroup | None) -> ParallelState:
    """Whatever a caller passed (``LLM(..., ep=...)`` hands an EP group) as a state."""
    if value is None:
        return SINGLE
    if isinstance(value, ExpertParallelGroup):
        return ParallelState.from_ep(value) if value.size > 1 else SINGLE
    return value
