"""Sparse MoE block: top-k router, grouped expert matmuls, optional shared expert.

Expert weights are stacked (fused in memory, per-expert on disk)::

    w13: [num_local_experts, 2 * intermediate, hidden]   gate rows, then up rows
    w2:  [num_local_experts, hidden, intermediate]

``expert_start`` is the global id of local expert 0, so an expert-parallel rank can hold
a contiguous slice of the experts; exchanging tokens with the other ranks is the EP
layer's (engine/parallel/ep_layers.py), splitting each expert the TP layer's
(engine/parallel/tp_layers.py). This one computes what it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.basic import (
    GatedMLP,
    Linear,
    can_prepack,
    packed_linear,
    prepack_weight,
    silu_and_mul,
)
from engine.model_spec import MoESpec


def route(
    router_logits: torch.Tensor, top_k: int, normalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, top-k, optional renormalisation. Returns ``(weights, expert_ids)``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


ExpertWeights = torch.Tensor | list[torch.Tensor]
"""Stacked ``[E_local, out, in]`` weights, or one oneDNN-prepacked matrix per expert."""


def _expert_linear(x: torch.Tensor, w: ExpertWeights, e: int) -> torch.Tensor:
    return packed_linear(x, w[e], None) if isinstance(w, list) else F.linear(x, w[e])


def expert_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    expert_start: int = 0,
) -> torch.Tensor:
    """Weighted sum of local experts' outputs for each token.

    ``x`` ``[N, H]``; ``weights``/``expert_ids`` ``[N, k]`` (global ids; ids outside
    ``[expert_start, expert_start + E_local)`` are ignored).
    """
    out = torch.zeros_like(x)
    num_local = len(w13)
    flat_ids = expert_ids.reshape(-1) - expert_start
    local = (flat_ids >= 0) & (flat_ids < num_local)
    slots = torch.nonzero(local).squeeze(-1)
    if slots.numel() == 0:
        return out
    order = slots[torch.argsort(flat_ids[slots], stable=True)]
    counts = torch.bincount(flat_ids[order], minlength=num_local).tolist()
    flat_weights = weights.reshape(-1)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        sel = order[start : start + count]
        start += count
        tokens = sel // expert_ids.shape[1]
        y = _expert_linear(silu_and_mul(_expert_linear(x[tokens], w13, e)), w2, e)
        out.index_add_(0, tokens, y * flat_weights[sel, None])
    return out


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden: int,
        spec: MoESpec,
        expert_start: int = 0,
        num_local: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.expert_start = expert_start
        num_local = spec.num_experts if num_local is None else num_local
        inter = spec.intermediate_size
        self.router = Linear(hidden, spec.num_experts)
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter), requires_grad=False)
        shared = spec.shared_expert_intermediate_size
        self.shared = GatedMLP(hidden, shared) if shared else None
        self.shared_gate = Linear(hidden, 1) if shared else None
        # Load statistics (engine/parallel/expert_load.py): the tokens this layer sees.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(spec.num_experts, dtype=torch.int64), persistent=False
        )

    def prepack(self) -> None:
        """On the CPU, each expert's matrices in oneDNN's layout; the stacked copies go."""
        if isinstance(self.w13, nn.Parameter) and can_prepack(self.w13[0]):
            self.w13_packed = [prepack_weight(w) for w in self.w13]
            self.w2_packed = [prepack_weight(w) for w in self.w2]
            self.w13 = self.w2 = None

    @property
    def expert_weights(self) -> tuple[ExpertWeights, ExpertWeights]:
        if self.w13 is None:
            return self.w13_packed, self.w2_packed
        return self.w13, self.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = expert_forward(x, weights, ids, *self.expert_weights, self.expert_start)
        return self.add_shared(x, out)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, global expert ids)`` ``[N, top_k]`` of each token, counted."""
        weights, ids = route(self.router(x), self.spec.top_k, self.spec.norm_topk_prob, x.dtype)
        self.tokens_per_expert += torch.bincount(ids.reshape(-1), minlength=self.spec.num_experts)
        return weights, ids

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out
