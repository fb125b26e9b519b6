"""The ``quantization_config`` of a compressed-tensors checkpoint (llm-compressor's
format, which vLLM loads), read into the schemes this engine runs.

A config maps groups of layers (``targets``: a class name such as ``Linear`` or a
``re:`` regex over module names, minus ``ignore``) to a scheme. Supported schemes::

    weights                         activations           name
    FP8 e4m3, per-tensor/channel    none                  fp8-w8a16
    FP8 e4m3, per-tensor/channel    FP8 dynamic per-token fp8-w8a8-dynamic
                                    or per-tensor
    INT8 symmetric, per-channel     none                  int8-w8a16
    INT8 symmetric, group-wise      none                  int8-w8a16-group

Anything else (INT4, asymmetric, static activation scales, block FP8, NVFP4, ...) is
refused with the scheme named and this list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # compressed_tensors imports torch._dynamo and triton (seconds, and
    # triton then decorates its language outside TRITON_INTERPRET): only when a
    # checkpoint is quantized, inside the functions below
    from compressed_tensors.quantization import QuantizationArgs

logger = logging.getLogger(__name__)

SUPPORTED = (
    "fp8-w8a16 (FP8 e4m3 weights, per-tensor or per-channel scales), "
    "fp8-w8a8-dynamic (the same, with FP8 activations quantized per token at run time), "
    "int8-w8a16 (symmetric INT8 weights, per-channel or group-wise scales)"
)
FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized")


@dataclass(frozen=True)
class WeightScheme:
    """How one linear layer's weight is stored and multiplied."""

    kind: Literal["fp8", "int8"]
    strategy: Literal["tensor", "channel", "group"]
    group_size: int | None = None
    dynamic_fp8_acts: bool = False
    """W8A8: activations quantized to FP8 per token (``act_strategy``) at run time."""
    act_strategy: Literal["token", "tensor"] = "token"
    packed: bool = False
    """INT8 stored as ``weight_packed`` int32 words (compressed-tensors pack-quantized)."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind == "fp8" else torch.int8

    @property
    def name(self) -> str:
        if self.kind == "fp8":
            return (
                f"fp8-w8a8-dynamic/{self.strategy}"
                if self.dynamic_fp8_acts
                else (f"fp8-w8a16/{self.strategy}")
            )
        return f"int8-w8a16/{self.strategy}" + (f"{self.group_size}" if self.group_size else "")


@dataclass(frozen=True)
class QuantConfig:
    """The parsed ``quantization_config``: ``scheme_for(module name)`` per linear layer."""

    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...]
    ignore: tuple[str, ...]
    fmt: str

    def scheme_for(self, hf_module: str) -> WeightScheme | None:
        """The scheme of HF module ``hf_module`` (e.g. ``model.layers.0.mlp.up_proj``),
        ``None`` if it stays dense."""
        from compressed_tensors.utils.match import is_match

        dummy = torch.nn.Linear(1, 1, device="meta")
        for targets, scheme in self.groups:
            if is_match(hf_module, dummy, targets, self.ignore):
                return scheme
        return None


def _describe(args: QuantizationArgs | None) -> str:
    if args is None:
        return "none"
    parts = [f"{args.type}{args.num_bits}", str(args.strategy)]
    if args.group_size:
        parts.append(f"group_size={args.group_size}")
    parts.append("symmetric" if args.symmetric else "asymmetric")
    parts.append("dynamic" if args.dynamic else "static")
    return " ".join(parts)


def _refuse(group: str, why: str, w, a) -> ValueError:
    return ValueError(
        f"unsupported compressed-tensors scheme in config group {group!r}: {why} "
        f"(weights: {_describe(w)}; input activations: {_describe(a)}). "
        f"Supported: {SUPPORTED}"
    )


def _weight_scheme(group: str, w, a, fmt: str) -> WeightScheme:
    if w is None or w.num_bits != 8 or w.type not in ("float", "int"):
        raise _refuse(group, "weights must be 8-bit float or int", w, a)
    if not w.symmetric or w.dynamic:
        raise _refuse(group, "weights must be symmetric with static scales", w, a)
    kind = "fp8" if w.type == "float" else "int8"
    strategies = ("tensor", "channel") if kind == "fp8" else ("channel", "group")
    if w.strategy not in strategies:
        raise _refuse(group, f"{kind} weights need a {' or '.join(strategies)} strategy", w, a)
    dynamic = False
    if a is not None:
        fp8_dyn = a.type == "float" and a.num_bits == 8 and a.dynamic is True and a.symmetric
        if kind != "fp8" or not fp8_dyn or a.strategy not in ("token", "tensor"):
            raise _refuse(group, "the only quantized activations run are FP8 dynamic", w, a)
        dynamic = True
    return WeightScheme(
        kind=kind,
        strategy=w.strategy,
        group_size=w.group_size if w.strategy == "group" else None,
        dynamic_fp8_acts=dynamic,
        act_strategy=a.strategy if a is not None else "token",
        packed=fmt == "pack-quantized",
    )


def parse_quant_config(cfg: dict[str, Any], source: str = "config.json") -> QuantConfig | None:
    """The quantization of a checkpoint's ``config.json`` (``None``: not quantized)."""
    raw = cfg.get("quantization_config")
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"{source}: quantization_config.quant_method={method!r} is not supported; "
            "pdserve loads compressed-tensors checkpoints (llm-compressor's format). "
            f"Supported schemes: {SUPPORTED}"
        )
    from compressed_tensors.quantization import QuantizationConfig

    try:
        parsed = QuantizationConfig.model_validate(raw)
    except Exception as e:  # pydantic's ValidationError, or a bad preset name
        raise ValueError(f"{source}: invalid compressed-tensors quantization_config: {e}") from None
    groups = []
    for name, scheme in parsed.config_groups.items():
        fmt = scheme.format or parsed.format
        if fmt not in FORMATS:
            raise ValueError(
                f"{source}: compressed-tensors format {fmt!r} (config group {name!r}) is not "
                f"supported; supported formats: {', '.join(FORMATS)}. Supported: {SUPPORTED}"
            )
        ws = _weight_scheme(name, scheme.weights, scheme.input_activations, fmt)
        groups.append((tuple(scheme.targets), ws))
    if parsed.kv_cache_scheme is not None:
        # The KV cache dtype is the engine's own setting, not the checkpoint's.
        logger.warning("%s: quantization_config.kv_cache_scheme is not read", source)
    return QuantConfig(tuple(groups), tuple(parsed.ignore or ()), parsed.format)
