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


def build_model(spec: ModelSpec, max_positions: int, expert_range: tuple[int, int] | None = None):
    """``(model, weight_targets)`` for ``spec.architecture``; an MoE model holds experts
    ``expert_range`` (default: all). A plain single-rank model: parallel layers are
    swapped in around it (engine/parallel/build.py)."""
    module = importlib.import_module(_FAMILIES[spec.architecture])
    return module.build(spec, max_positions, expert_range)
