"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) and the shared decoder stack.

Differences between the family members are config flags on :class:`ModelSpec`: QKV bias
(Qwen2), per-head q/k RMSNorm (Qwen3), sliding window (Mistral), llama3 rope scaling.
MoE models (``models/moe.py``) reuse this stack with a sparse MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.layers.attention import Attention
from engine.layers.basic import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from engine.layers.weights import WeightTarget
from engine.model_spec import ModelSpec

MLPFactory = Callable[[int], nn.Module]
"""Builds layer ``i``'s MLP."""


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__()
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, rotary)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual stream)``: the layer's output is their sum, which the
        next norm adds (fused with the norm, as vLLM does); ``residual=None`` for layer 0."""
        if residual is None:
            residual, hidden = hidden, self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm(hidden, residual)
        hidden = self.attn(positions, hidden, kv_cache, meta, backend)
        hidden, residual = self.post_attn_norm(hidden, residual)
        return self.mlp(hidden), residual


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head, over a flat token batch."""

    def __init__(
        self, spec: ModelSpec, max_positions: int, mlp_factory: MLPFactory | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        make_mlp = mlp_factory or (lambda i: GatedMLP(spec.hidden_size, spec.intermediate_size))
        rotary = RotaryEmbedding(spec.rope, spec.head_dim, max_positions)
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, rotary, make_mlp(i)) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = (
            None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[num_tokens, hidden]``; ``after_layer(i)`` runs once
        layer ``i``'s KV is in the cache (disaggregated prefill streams it from there)."""
        hidden, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, kv_caches[i], meta, backend, residual)
            if after_layer is not None:
                after_layer(i)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed.weight).float()
        return self.lm_head(hidden).float()


def dense_weight_targets(spec: ModelSpec) -> dict[str, WeightTarget]:
    """HF tensor name -> target, for everything but the MLP."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    targets = {
        "model.embed_tokens.weight": WeightTarget("embed.weight"),
        "model.norm.weight": WeightTarget("norm.weight"),
    }
    if not spec.tie_word_embeddings:
        targets["lm_head.weight"] = WeightTarget("lm_head.weight")
    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        targets[f"{hf}.input_layernorm.weight"] = WeightTarget(f"{ours}.input_norm.weight")
        targets[f"{hf}.post_attention_layernorm.weight"] = WeightTarget(
            f"{ours}.post_attn_norm.weight"
        )
        targets[f"{hf}.self_attn.o_proj.weight"] = WeightTarget(f"{ours}.attn.o.weight")
        kinds = ("weight", "bias") if spec.qkv_bias else ("weight",)
        for kind in kinds:
            for name, off, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                targets[f"{hf}.self_attn.{name}_proj.{kind}"] = WeightTarget(
                    f"{ours}.attn.qkv.{kind}", row_offset=off, rows=rows
                )
        if spec.qk_norm:
            targets[f"{hf}.self_attn.q_norm.weight"] = WeightTarget(f"{ours}.attn.q_norm.weight")
            targets[f"{hf}.self_attn.k_norm.weight"] = WeightTarget(f"{ours}.attn.k_norm.weight")
    return targets


def gated_mlp_targets(hf_prefix: str, ours: str, intermediate: int) -> dict[str, WeightTarget]:
    """Targets of a gate/up/down MLP stored as HF ``gate_proj``/``up_proj``/``down_proj``."""
    return {
        f"{hf_prefix}.gate_proj.weight": WeightTarget(f"{ours}.gate_up.weight", rows=intermediate),
        f"{hf_prefix}.up_proj.weight": WeightTarget(
            f"{ours}.gate_up.weight", row_offset=intermediate, rows=intermediate
        ),
        f"{hf_prefix}.down_proj.weight": WeightTarget(f"{ours}.down.weight"),
    }


def build(
    spec: ModelSpec, max_positions: int, expert_range: tuple[int, int] | None = None
) -> tuple[CausalLM, dict[str, WeightTarget]]:
    """A dense model and its weight targets."""
    targets = dense_weight_targets(spec)
    for i in range(spec.num_layers):
        targets.update(
            gated_mlp_targets(f"model.layers.{i}.mlp", f"layers.{i}.mlp", spec.intermediate_size)
        )
    return CausalLM(spec, max_positions), targets
