"""Architecture-neutral description of a decoder model, parsed from HF ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    rope_type: str = "default"
    """``default`` or ``llama3``."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0
    """0 = no shared expert."""
    sparse_layers: tuple[int, ...] = ()
    """Layers whose MLP is the MoE block (others use a dense MLP)."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoESpec | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _rope(cfg: dict[str, Any]) -> RopeSpec:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    return RopeSpec(
        theta=float(theta),
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _moe(arch: str, cfg: dict[str, Any], num_layers: int) -> MoESpec | None:
    if arch not in MOE_ARCHITECTURES:
        return None
    if arch == "MixtralForCausalLM":
        return MoESpec(
            num_experts=cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            intermediate_size=cfg["intermediate_size"],
            norm_topk_prob=True,
            sparse_layers=tuple(range(num_layers)),
        )
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    shared = cfg.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
    return MoESpec(
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", arch == "Qwen3MoeForCausalLM")),
        shared_expert_intermediate_size=shared or 0,
        sparse_layers=sparse,
    )


def _sliding_window(arch: str, cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
        return None
    return int(window)


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_model_spec(cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Validate an HF config dict and turn it into a :class:`ModelSpec`."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or None} in {source}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        num_layers = cfg["num_hidden_layers"]
        qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        return ModelSpec(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope=_rope(cfg),
            qkv_bias=cfg.get("qkv_bias", True) if qwen2 else cfg.get("attention_bias", False),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=_sliding_window(arch, cfg),
            eos_token_ids=_eos_ids(cfg),
            moe=_moe(arch, cfg, num_layers),
            hf_config=cfg,
        )
    except KeyError as e:
        raise ValueError(f"{source} lacks required field {e.args[0]!r} for {arch}") from None
