"""Deterministic tiny random-init checkpoints and a byte-level BPE tokenizer, all offline.

``make_tiny_model("llama", DIR)`` writes a Hugging Face checkpoint directory that both
this engine and ``transformers`` load: ``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (with a chat
template that renders tools: engine/chat_templates.py). The weights use a large
initializer range so that greedy choices have wide margins and never hinge on float
rounding between implementations.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.chat_templates import TEMPLATES
from engine.layers.weights import WeightTarget
from engine.model_spec import parse_model_spec
from engine.models import build_model

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
INIT_RANGE = 1.0

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": INIT_RANGE,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    "torch_dtype": "float32",
}
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "rope_parameters": _ROPE,
        "sliding_window": 32,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_parameters": _ROPE,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rope_parameters": _ROPE,
        "attention_bias": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "rope_parameters": _ROPE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 32,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "rope_parameters": _ROPE,
        "num_experts": 4,
        **_MOE,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "rope_parameters": _ROPE,
        "num_experts": 4,
        **_MOE,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
    },
}


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE trained on the corpus shipped in ``engine/data``."""
    text = resources.files("engine").joinpath("data/corpus.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tok


def tiny_config(
    arch: str, eos_token_id: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The tiny config of ``arch``; ``overrides`` replace fields (e.g. a benchmark shape)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(ARCHS)}")
    base = {**_COMMON, **ARCHS[arch], "eos_token_id": eos_token_id, "bos_token_id": None}
    return {**base, **(overrides or {})}


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if name == "model.embed_tokens.weight":
        return noise
    return INIT_RANGE * noise


def _target_shape(param: torch.Tensor, target: WeightTarget) -> tuple[int, ...]:
    shape = list(param.shape if target.expert is None else param.shape[1:])
    if target.rows is not None:
        shape[0] = target.rows
    return tuple(shape)


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights under their on-disk Hugging Face names."""
    spec = parse_model_spec(config)
    with torch.device("meta"):
        model, targets = build_model(spec, max_positions=8)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    return {
        name: _init_tensor(name, _target_shape(params[t.param], t), gen).contiguous()
        for name, t in sorted(targets.items())
    }


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    chat_format: str = "hermes",
    quantize: str | None = None,
) -> Path:
    """Write a tiny checkpoint for ``arch`` into ``out_dir`` and return its path;
    ``overrides`` change config fields (shapes) before the weights are drawn;
    ``chat_format``: its chat template, ``hermes`` (ChatML) or ``llama3``; ``quantize``
    (a preset of engine/quant/checkpoint.py) stores the linear weights in compressed-tensors
    format, quantized from the same random weights."""
    if chat_format not in TEMPLATES:
        raise ValueError(f"unknown chat format {chat_format!r}; choose one of {sorted(TEMPLATES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("building tiny %s model in %s", arch, out)
    tok = train_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    config = tiny_config(arch, eos, overrides)
    weights = random_weights(config, seed)
    if quantize is not None:
        from engine.quant.checkpoint import compress_weights

        weights, config["quantization_config"] = compress_weights(weights, quantize)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"eos_token_id": eos, "do_sample": False})
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": TEMPLATES[chat_format],
        },
    )
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


DEMO_ARCH = "llama"


def demo_model_dir() -> Path:
    """Where the tiny demo model is cached (``$PDSERVE_CACHE`` or ``~/.cache/pdserve``)."""
    root = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return root / f"tiny-{DEMO_ARCH}"


def ensure_demo_model() -> Path:
    """Build the deterministic demo model on first use and return its directory."""
    path = demo_model_dir()
    if not (path / "config.json").is_file():
        logging.getLogger("pdserve").info("building the tiny demo model in %s", path)
        make_tiny_model(DEMO_ARCH, path)
    else:
        refresh_chat_template(path)
    return path


def refresh_chat_template(path: Path) -> None:
    """A demo model built by an older pdserve gets the current chat template (it renders
    tools now); weights and tokenizer are unchanged."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("chat_template") != TEMPLATES["hermes"]:
        cfg["chat_template"] = TEMPLATES["hermes"]
        _write_json(cfg_path, cfg)
