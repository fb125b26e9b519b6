"""Quantized linear layers, applied to a built model from outside (as parallelism is).

:func:`apply_quantization` gives every :class:`~engine.layers.basic.Linear` the config
targets a :class:`QuantMethod`: its ``weight`` becomes the 8-bit matrix and a
``weight_scale`` parameter joins it; ``Linear.forward`` hands the product to the method.
The layer keeps its class, so a tensor-parallel layer stays one and still names the
slice it holds; the method turns that slice of the plain weight into the slice of the
on-disk tensors it stands for::

    on disk (compressed-tensors)         in memory                 a TP shard reads
    X.weight         [out, in] i8/fp8    weight [out, in]          rows / cols as dense
    X.weight_packed  [out, in/4] int32   (pack-quantized INT8)     cols / 4
    X.weight_scale   [1] | [out, 1]      weight_scale [out, 1]     rows (all of a [1])
                     | [out, in/g]       | [out, in/g] fp32        rows, cols / g

A fused layer (q|k|v, gate|up) takes each part's per-tensor scale into its own rows, so
the parts need no common scale. Routed MoE experts are stacked matrices with no
quantized grouped GEMM here: a checkpoint that quantizes them is refused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.kernels import cpu_int8_linear
from engine.layers.basic import Linear, can_prepack, packed_linear, prepack_weight
from engine.layers.moe import SparseMoE
from engine.layers.weights import WeightRead, WeightTarget
from engine.quant import ops
from engine.quant.config import QuantConfig, WeightScheme

logger = logging.getLogger(__name__)


class QuantMethod:
    """How one layer's 8-bit weight loads and multiplies."""

    def __init__(self, scheme: WeightScheme, dtype: torch.dtype) -> None:
        self.scheme = scheme
        self.dtype = dtype
        """The model's (activation) dtype."""
        self.packed_scale: torch.Tensor | None = None
        self.kernel_scale: torch.Tensor | None = None
        """CPU INT8: the scales for the C kernel (rounded to the model dtype, as
        :func:`ops.dequantize` rounds them), when it takes this weight."""
        self.dense: torch.Tensor | None = None
        """CPU FP8: the dequantized weight in oneDNN's layout."""

    def create(self, layer: Linear, where: str) -> None:
        out, cols = layer.weight.shape
        g = self.scheme.group_size
        if g is not None and cols % g:
            raise ValueError(
                f"{where}: {cols} input columns are not a multiple of the quantization "
                f"group size {g} (with tensor parallelism: per rank); use a TP size that "
                "keeps whole groups on each rank"
            )
        if self.scheme.packed and cols % 4:
            raise ValueError(f"{where}: {cols} packed INT8 columns per rank must divide by 4")
        groups = cols // g if g is not None else 1
        layer.weight = nn.Parameter(
            torch.empty(out, cols, dtype=self.scheme.dtype), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(torch.empty(out, groups), requires_grad=False)
        layer.quant = self

    def read(self, name: str, read: WeightRead) -> WeightRead:
        """The on-disk slice of ``name`` for the dense-weight slice ``read``."""
        src = read.source
        if name == "weight" and self.scheme.packed and len(src) == 2:
            cols = src[1]
            return WeightRead((src[0], slice(cols.start // 4, cols.stop // 4)), read.dest_rows)
        if name != "weight_scale" or not src:
            return read
        if self.scheme.strategy == "tensor":
            return WeightRead((), read.dest_rows)
        rows, cols = src[0], src[1] if len(src) == 2 else slice(None)
        if cols == slice(None) or self.scheme.strategy == "channel":
            return WeightRead((rows,) if rows != slice(None) else (), read.dest_rows)
        g = self.scheme.group_size
        return WeightRead((rows, slice(cols.start // g, cols.stop // g)), read.dest_rows)

    def convert(self, name: str, tensor: torch.Tensor, shape: torch.Size, where: str):
        """The on-disk ``tensor`` as the in-memory parameter slice of ``shape`` holds it."""
        if name == "weight_scale":
            t = tensor.to(torch.float32)
            return t.reshape(1, 1).expand(shape) if t.numel() == 1 else t.reshape(shape)
        if name != "weight":
            return tensor
        if self.scheme.packed:
            if tensor.dtype != torch.int32:
                raise ValueError(f"{where}: weight_packed is {tensor.dtype}, expected int32")
            # 8-bit pack-quantized: value + 128 in each byte, little-endian, 4 per word.
            unpacked = (tensor.contiguous().view(torch.uint8) ^ 0x80).view(torch.int8)
            return unpacked[:, : shape[1]]
        if tensor.dtype != self.scheme.dtype:
            raise ValueError(
                f"{where}: weight is {tensor.dtype}, but the quantization_config scheme "
                f"{self.scheme.name} stores {self.scheme.dtype}"
            )
        return tensor

    def prepack(self, layer: Linear) -> None:
        """CPU only (the loader calls it last): INT8 keeps its int8 matrix for the C
        kernel (or, per-channel, torch's packed one); FP8, which no CPU multiplies, is dequantized once into the
        model dtype and oneDNN's layout (exactly the per-call dequantization, without its
        cost per step; it then holds bf16's bytes)."""
        s, w = self.scheme, layer.weight
        if w.device.type != "cpu":
            return
        scale = layer.weight_scale.to(self.dtype).float().contiguous()
        if s.kind == "int8" and cpu_int8_linear.takes_weight(w, scale):
            self.kernel_scale = scale
        elif s.kind == "int8" and s.strategy == "channel":
            self.packed_scale = layer.weight_scale.reshape(-1).to(torch.bfloat16)
        elif s.kind == "fp8" and can_prepack(torch.empty(1, 1, dtype=self.dtype)):
            self.dense = prepack_weight(ops.dequantize(w, layer.weight_scale, self.dtype))
            layer.weight = layer.weight_scale = None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        s, w, scale = self.scheme, layer.weight, layer.weight_scale
        if x.device.type == "cuda":
            return _cuda_apply(s, x, w, scale, layer.bias)
        if s.dynamic_fp8_acts:
            x = ops.fake_quant_fp8_acts(x, s.act_strategy == "token")
        if self.dense is not None:
            return packed_linear(x, self.dense, layer.bias)
        return ops.cpu_linear(x, w, scale, layer.bias, self.packed_scale, self.kernel_scale)


def _cuda_apply(s: WeightScheme, x, w, scale, bias) -> torch.Tensor:
    if s.dynamic_fp8_acts and s.strategy != "group" and ops.has_fp8_mm(x.device):
        return ops.scaled_mm_fp8(x, w, scale, bias, s.act_strategy == "token")
    if s.dynamic_fp8_acts:
        x = ops.fake_quant_fp8_acts(x, s.act_strategy == "token")
    from engine.kernels.w8a16_gemm import w8a16_linear

    return w8a16_linear(x, w, scale, bias)


def _owner(param: str) -> tuple[str, str]:
    owner, _, leaf = param.rpartition(".")
    return owner, leaf


def _layer_schemes(
    model: nn.Module, targets: dict[str, WeightTarget], cfg: QuantConfig
) -> dict[str, tuple[WeightScheme | None, list[str]]]:
    """Per ``Linear`` owner: its scheme and the HF modules fused into it."""
    found: dict[str, tuple[WeightScheme | None, list[str]]] = {}
    for name, target in targets.items():
        owner, leaf = _owner(target.param)
        if leaf not in ("weight", "w13", "w2") or not name.endswith(".weight"):
            continue
        hf = name.removesuffix(".weight")
        module = model.get_submodule(owner)
        scheme = cfg.scheme_for(hf)
        if isinstance(module, SparseMoE) and leaf != "weight" and scheme is not None:
            raise ValueError(
                f"quantized MoE expert weights ({hf}: {scheme.name}) are not supported: "
                "experts run as stacked matrices without a quantized grouped GEMM. Keep them "
                "dense (add 're:.*experts.*' to the quantization_config ignore list)"
            )
        if not isinstance(module, Linear):
            continue
        prev = found.get(owner)
        if prev is not None and prev[0] != scheme:
            raise ValueError(
                f"{hf} ({scheme.name if scheme else 'dense'}) and {prev[1][0]} "
                f"({prev[0].name if prev[0] else 'dense'}) are fused into one layer and "
                "need one scheme; quantize them alike"
            )
        found.setdefault(owner, (scheme, []))[1].append(hf)
    return found


def apply_quantization(
    model: nn.Module, targets: dict[str, WeightTarget], cfg: QuantConfig, dtype: torch.dtype
) -> dict[str, WeightTarget]:
    """Quantize ``model``'s targeted linears in place; returns the weight targets of the
    checkpoint's tensors (8-bit weights and their scales)."""
    out = dict(targets)
    schemes = _layer_schemes(model, targets, cfg)
    count = 0
    for owner, (scheme, hf_modules) in schemes.items():
        if scheme is None:
            continue
        QuantMethod(scheme, dtype).create(model.get_submodule(owner), hf_modules[0])
        count += 1
        for hf in hf_modules:
            t = out.pop(f"{hf}.weight")
            out[f"{hf}.weight_packed" if scheme.packed else f"{hf}.weight"] = t
            out[f"{hf}.weight_scale"] = WeightTarget(
                f"{owner}.weight_scale", t.expert, t.row_offset, t.rows
            )
    names = sorted({s.name for s, _ in schemes.values() if s is not None})
    logger.info("quantized %d linear layers (%s)", count, ", ".join(names) or "none")
    return out
