"""A tiny checkpoint whose greedy path is decisive enough to judge a quantized KV cache.

The demo tiny models draw every projection from N(0, 1) (``INIT_RANGE``) on 64-wide
layers: each layer multiplies activations by ~8, so the network is chaotic and a
perturbation as small as storing K/V in bf16 instead of fp32 already changes the first 16
greedy tokens of 12 of 32 prompts. That is no test of quantization. This one rescales
every projection to ``GAIN / sqrt(fan_in)`` (a well-conditioned network whose attention
still matters): measured on the 32-prompt set of ``tests/engine/test_quant_kv.py``,

* bf16-rounded K/V agree with the fp32 cache on 32/32 prompts (decisive),
* K/V read as zeros agree on 9/32, K/V read 1.5x too large on 16/32, and K/V read
  without their scale on 0/32 (attention matters: a broken dequantization shows).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from engine.tiny_model import make_tiny_model

GAIN = 0.35


def make_decisive_model(out_dir: Path, arch: str = "llama") -> Path:
    """The tiny ``arch`` checkpoint with its projections rescaled (embeddings kept)."""
    path = make_tiny_model(arch, out_dir)
    weights = load_file(str(path / "model.safetensors"))
    for name, w in weights.items():
        if w.dim() == 2 and name != "model.embed_tokens.weight":
            weights[name] = (w * (GAIN / w.shape[1] ** 0.5)).contiguous()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
