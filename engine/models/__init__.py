"""Model families, looked up by HF architecture name and imported lazily."""

from __future__ import annotations

import importlib

from engine.model_spec import ModelSpec

_FAMILIES = {
    "LlamaForCausalLM": "engine.models.llama",
    "MistralForCausalLM": "engine.models.llama",
    "Qwen2ForCausalLM": "engine.models.llama",
    "Qwen3ForCausalLM": "engine.models.llama",
    "MixtralForCausalLM": "engine.models.moe",
    "Qwen2MoeForCausalLM": "engine.models.moe",
    "Qwen3MoeForCausalLM": "engine.models.moe",
}


def build_model(
    spec: ModelSpec,
    max_positions: int,
    expert_range: tuple[int, int] | None = None,
    ep=None,
):
    """``(model, weight_targets)`` for ``spec.architecture``; ``ep`` splits MoE experts."""
    module = importlib.import_module(_FAMILIES[spec.architecture])
    if ep is None or ep.size == 1:
        return module.build(spec, max_positions, expert_range)
    if spec.moe is None:
        raise ValueError(
            f"--ep-size {ep.size} needs an MoE model; {spec.architecture} has no experts"
        )
    return module.build(spec, max_positions, ep=ep)
