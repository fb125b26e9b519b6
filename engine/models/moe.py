"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (shared expert + gate), Qwen3-MoE.

They share the Llama-family stack (``models/llama.py``); layers listed in
``MoESpec.sparse_layers`` use :class:`~engine.layers.moe.SparseMoE`. On disk each expert
is its own tensor; in memory they are stacked per layer.
"""

from __future__ import annotations

from engine.layers.basic import GatedMLP
from engine.layers.moe import SparseMoE
from engine.model_spec import ModelSpec
from engine.models.llama import CausalLM, WeightTarget, dense_weight_targets, gated_mlp_targets

# Per-expert tensor names on disk: (gate, up, down).
_EXPERT_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def _moe_targets(spec: ModelSpec, layer: int, experts: range) -> dict[str, WeightTarget]:
    block, gate, up, down = _EXPERT_NAMES[spec.architecture]
    hf, ours = f"model.layers.{layer}.{block}", f"layers.{layer}.mlp"
    inter = spec.moe.intermediate_size
    targets = {f"{hf}.gate.weight": WeightTarget(f"{ours}.router.weight")}
    for local, e in enumerate(experts):
        targets[f"{hf}.experts.{e}.{gate}.weight"] = WeightTarget(f"{ours}.w13", local, 0, inter)
        targets[f"{hf}.experts.{e}.{up}.weight"] = WeightTarget(f"{ours}.w13", local, inter, inter)
        targets[f"{hf}.experts.{e}.{down}.weight"] = WeightTarget(f"{ours}.w2", local)
    if spec.moe.shared_expert_intermediate_size:
        targets.update(
            gated_mlp_targets(
                f"{hf}.shared_expert", f"{ours}.shared", spec.moe.shared_expert_intermediate_size
            )
        )
        targets[f"{hf}.shared_expert_gate.weight"] = WeightTarget(f"{ours}.shared_gate.weight")
    return targets


def build(
    spec: ModelSpec,
    max_positions: int,
    expert_range: tuple[int, int] | None = None,
) -> tuple[CausalLM, dict[str, WeightTarget]]:
    """An MoE model holding experts ``expert_range`` (default: all)."""
    moe = spec.moe
    start, end = expert_range or (0, moe.num_experts)
    sparse = set(moe.sparse_layers)

    def make_mlp(i: int):
        if i in sparse:
            return SparseMoE(spec.hidden_size, moe, start, end - start)
        return GatedMLP(spec.hidden_size, spec.intermediate_size)

    targets = dense_weight_targets(spec)
    for i in range(spec.num_layers):
        if i in sparse:
            targets.update(_moe_targets(spec, i, range(start, end)))
        else:
            targets.update(
                gated_mlp_targets(
                    f"model.layers.{i}.mlp", f"layers.{i}.mlp", spec.intermediate_size
                )
            )
    return CausalLM(spec, max_positions, make_mlp), targets
