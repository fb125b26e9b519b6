"""Expert load statistics: tokens routed to each expert and to each EP rank.

The router gate runs on every rank over every token, so any rank (the leader) can count
the whole batch's routing without communication; a rank's load is the sum over the
experts it owns. Balancedness is ``mean / max`` (1.0 = perfectly even).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def expert_load(model: nn.Module, ep_size: int = 1) -> ExpertLoad | None:
    """Counts of every MoE layer's ``tokens_per_expert`` buffer; ``None`` for dense models."""
    counts = [m.tokens_per_expert for m in model.modules() if hasattr(m, "tokens_per_expert")]
    if not counts:
        return None
    total = torch.stack([c.cpu() for c in counts]).sum(0)
    per_rank = total.view(ep_size, -1).sum(1)
    return ExpertLoad(tuple(total.tolist()), tuple(per_rank.tolist()))
