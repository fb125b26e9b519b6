"""Quantized tiny checkpoints for the quant tests, and their dense twins.

The tiny checkpoints are drawn with a wide initializer (engine/tiny_model.py), so each
greedy choice wins by a margin far above float rounding, and an 8-bit weight that lost
its scale (x 0.004 for INT8, x 0.001-ish for FP8) changes every logit by orders of
magnitude: a test that compares with HF cannot pass on such a kernel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file, save_file

from engine.tiny_model import make_tiny_model

PRESETS = ["fp8", "fp8-tensor", "fp8-dynamic", "int8", "int8-group"]


def build(root: Path, arch: str, preset: str, overrides: dict | None = None) -> Path:
    d = root / f"{arch}-{preset}"
    if not (d / "config.json").is_file():
        make_tiny_model(arch, d, quantize=preset, overrides=overrides)
    return d


def dequantized_copy(quant_dir: Path, out_dir: Path) -> Path:
    """The same checkpoint with every quantized weight decompressed by the package
    (float, no ``quantization_config``): HF's reference where it cannot load the
    quantized checkpoint itself (its MoE expert merging, transformers 5.2x)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    shutil.copytree(quant_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    scheme = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(qcfg.format)
    tensors = load_file(str(out_dir / "model.safetensors"))
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    for m in modules:
        local = {k.removeprefix(m + "."): tensors.pop(k) for k in list(tensors) if k.startswith(m + ".")}  # fmt: skip
        tensors[f"{m}.weight"] = compressor.decompress(local, scheme)["weight"].to(torch.float32)
        if "bias" in local:  # a Qwen2 QKV bias is not part of the compressed state
            tensors[f"{m}.bias"] = local["bias"]
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
