"""The expert-parallel MoE layer and how an EP replica is built around the plain model.

The plain model is built holding this rank's contiguous slice of every MoE layer's
experts (``expert_range``); :func:`apply_ep` then swaps each :class:`SparseMoE` for an
:class:`EPSparseMoE`, which routes its tokens (this rank's home sequences only: attention
is data-parallel) to the experts' owners and combines the answers
(engine/parallel/ep.py). Router and shared expert run on the rank's own tokens.
"""

from __future__ import annotations

import torch

from engine.layers.moe import SparseMoE, expert_forward
from engine.model_spec import ModelSpec
from engine.parallel.ep import ExpertParallelGroup, ep_expert_forward
from engine.parallel.tp_layers import adopt


class EPSparseMoE(SparseMoE):
    ep: ExpertParallelGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = ep_expert_forward(x, weights, ids, self.spec.num_experts, self.ep, self._run_received)
        return self.add_shared(x, out)

    def _run_received(
        self, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of this rank's experts for rows routed here (other ranks' ids in
        ``ids`` ``[R, k]`` are ignored)."""
        return expert_forward(rows, weights, ids, *self.expert_weights, self.expert_start)


def ep_expert_range(spec: ModelSpec, ep: ExpertParallelGroup) -> tuple[int, int]:
    """The experts this rank holds; a dense model cannot be expert-parallel."""
    if spec.moe is None:
        raise ValueError(
            f"--ep-size {ep.size} needs an MoE model; {spec.architecture} has no experts"
        )
    return ep.expert_range(spec.moe.num_experts)


def apply_ep(model, ep: ExpertParallelGroup) -> None:
    """Swap every MoE layer of ``model`` for its expert-parallel form."""
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = adopt(EPSparseMoE, layer.mlp, ep=ep)
