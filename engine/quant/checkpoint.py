"""Write a checkpoint's linear weights in compressed-tensors format, with the package's
own quantizer and compressors (so the tensors and ``quantization_config`` are the ones
llm-compressor writes, and vLLM or ``transformers`` read).

Presets (``pdserve make-tiny-model --quantize NAME``)::

    fp8          FP8 e4m3 weights, per-channel scales, W8A16       float-quantized
    fp8-tensor   FP8 e4m3 weights, one scale per tensor, W8A16     float-quantized
    fp8-dynamic  per-channel FP8 weights + dynamic per-token FP8   float-quantized
                 activations (llm-compressor's FP8_DYNAMIC)
    int8         symmetric INT8 weights, per-channel, W8A16        pack-quantized
    int8-group   symmetric INT8 weights, groups of 32 columns      pack-quantized

Linear weights of the decoder layers are quantized; ``lm_head`` and the MoE router and
expert weights stay dense (listed in ``ignore``, as llm-compressor recipes do).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.utils import calculate_qparams

_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
PRESETS: dict[str, dict[str, Any]] = {
    "fp8": {"weights": {**_FP8, "strategy": "channel"}},
    "fp8-tensor": {"weights": {**_FP8, "strategy": "tensor"}},
    "fp8-dynamic": {
        "weights": {**_FP8, "strategy": "channel"},
        "input_activations": {**_FP8, "strategy": "token", "dynamic": True},
    },
    "int8": {"weights": {**_INT8, "strategy": "channel"}},
    "int8-group": {"weights": {**_INT8, "strategy": "group", "group_size": 32}},
}
IGNORE = [
    "lm_head",
    "re:.*(mlp|block_sparse_moe)\\.gate$",
    "re:.*shared_expert_gate$",
    "re:.*experts.*",
]
_LINEAR = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$|^lm_head\.weight$")


def quant_scheme(preset: str) -> QuantizationScheme:
    if preset not in PRESETS:
        raise ValueError(f"unknown --quantize {preset!r}; choose one of {sorted(PRESETS)}")
    args = {k: QuantizationArgs(**v) for k, v in PRESETS[preset].items()}
    return QuantizationScheme(targets=["Linear"], **args)


def quant_config(preset: str) -> QuantizationConfig:
    scheme = quant_scheme(preset)
    fmt = "float-quantized" if scheme.weights.type == "float" else "pack-quantized"
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        ignore=list(IGNORE),
        quantization_status=QuantizationStatus.COMPRESSED,
    )


def _weight_scale(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Min/max scales as the package computes them (``[1]``, ``[out, 1]`` or
    ``[out, in // group]``)."""
    w = weight.float()
    if args.strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif args.strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        grouped = w.unflatten(-1, (-1, args.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale, _ = calculate_qparams(lo, hi, args)
    return scale.to(weight.dtype)


def compress_weights(
    weights: dict[str, torch.Tensor], preset: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``weights`` (HF names) with every targeted linear weight replaced by its
    compressed tensors, and the ``quantization_config`` for ``config.json``."""
    config = quant_config(preset)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(config.format)
    dummy = torch.nn.Linear(1, 1, device="meta")
    out: dict[str, torch.Tensor] = {}
    from compressed_tensors.utils.match import is_match

    for name, tensor in weights.items():
        module = name.removesuffix(".weight")
        if not _LINEAR.match(name) or not is_match(module, dummy, ["Linear"], config.ignore):
            out[name] = tensor
            continue
        state = {"weight": tensor, "weight_scale": _weight_scale(tensor, scheme.weights)}
        for key, value in compressor.compress(state, scheme).items():
            out[f"{module}.{key}"] = value.contiguous()
    return out, config.to_dict()
