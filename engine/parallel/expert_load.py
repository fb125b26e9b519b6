"""Expert load statistics: tokens routed to each expert and to each EP rank.

Each MoE layer counts the routing of the tokens it sees. With expert parallelism a rank
sees only its home sequences' tokens, so after every step :class:`ExpertCountSync`
``reduce``-s each rank's new counts (``[num_experts]`` int64, tiny) onto the leader, which
exports the totals. A rank's load is the sum over the experts it owns. Balancedness is
``mean / max`` (1.0 = perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.ep import ExpertParallelGroup


@dataclass(frozen=True)
class ExpertLoad:
    tokens_per_expert: tuple[int, ...]
    """(token, expert) assignments per global expert, summed over MoE layers."""
    tokens_per_rank: tuple[int, ...]
    """The same, summed over each EP rank's contiguous slice of experts."""

    @property
    def expert_balancedness(self) -> float:
        return _balancedness(self.tokens_per_expert)

    @property
    def rank_balancedness(self) -> float:
        return _balancedness(self.tokens_per_rank)


def _balancedness(counts: tuple[int, ...]) -> float:
    top = max(counts, default=0)
    return sum(counts) / len(counts) / top if top else 1.0


def expert_counts(model: nn.Module) -> torch.Tensor | None:
    """This rank's ``[num_experts]`` counts summed over MoE layers; ``None`` for dense."""
    counts = [m.tokens_per_expert for m in model.modules() if hasattr(m, "tokens_per_expert")]
    if not counts:
        return None
    return torch.stack([c.cpu() for c in counts]).sum(0)


def expert_load(counts: torch.Tensor | None, ep_size: int = 1) -> ExpertLoad | None:
    """Per-expert and per-rank load from ``[num_experts]`` counts (``None``: dense)."""
    if counts is None:
        return None
    per_rank = counts.view(ep_size, -1).sum(1)
    return ExpertLoad(tuple(counts.tolist()), tuple(per_rank.tolist()))


class ExpertCountSync:
    """Sums every rank's counts onto the leader, one small ``reduce`` per step."""

    def __init__(self, model: nn.Module, ep: ExpertParallelGroup) -> None:
        self.model, self.ep = model, ep
        self._seen = expert_counts(model)
        self.total = None if self._seen is None else torch.zeros_like(self._seen)
        """Leader: counts of every rank since start."""

    def step(self) -> None:
        """Collective: call on every rank after every non-empty step."""
        if self._seen is None:
            return
        now = expert_counts(self.model)
        delta, self._seen = now - self._seen, now
        dist.reduce(delta, 0, group=self.ep.cpu_group)
        if self.ep.is_leader:
            self.total += delta
