"""INT8 weight-only linear on the CPU (``csrc/int8_linear_cpu.c``): ``x @ (w * s)^T + b``.

The int8 matrix is read once per call and widened to fp32 in registers, so a decode step
(few rows, bound by the weight bytes) reads half of bf16's bytes. :func:`usable` says
whether a call can take it (library built with AVX-512, CPU tensors, bf16/fp32
activations, a group size of a multiple of 16 columns); engine/quant/ops.py keeps the
torch path for everything else.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels import cpu_build

_NAMES = {torch.float32: "int8_linear_f32", torch.bfloat16: "int8_linear_bf16"}
_FMA_BF16 = "int8_linear_fma_bf16"
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _declare(lib: ctypes.CDLL) -> None:
    lib.int8_linear_supported.restype, lib.int8_linear_supported.argtypes = _I, []
    lib.int8_dequant_bf16.restype = _I
    lib.int8_dequant_bf16.argtypes = [_P, _P, _I, _P, _I64, _I64, _I]
    for name in (*_NAMES.values(), _FMA_BF16):
        fn = getattr(lib, name)
        fn.restype = _I
        fn.argtypes = [_P, _I64, _P, _P, _I, _P, _P, _I64, _I, _I, _I, _I]


def available() -> bool:
    """Built, and built for a CPU with AVX-512 (F and BW)."""
    lib = cpu_build.library(_declare)
    return lib is not None and bool(lib.int8_linear_supported())


def takes_activations(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NAMES


def takes_weight(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """A CPU int8 ``[N, K]`` matrix with fp32 scales of whole 16-column groups."""
    cols = weight.shape[1]
    groups = scale.shape[1]
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.int8
        and weight.is_contiguous()
        and scale.dtype == torch.float32
        and scale.is_contiguous()
        and (groups == 1 or (cols % groups == 0 and (cols // groups) % 16 == 0))
        and available()
    )


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    vnni: bool = True,
) -> torch.Tensor:
    """``x`` ``[..., K]`` times int8 ``weight`` ``[N, K]`` with fp32 ``scale`` ``[N, G]``
    (see :func:`usable`); ``bias`` ``[N]`` in ``x``'s dtype. Returns ``[..., N]``.
    ``vnni=False`` keeps bf16 activations off the VNNI kernel (tests run both)."""
    n, k = weight.shape
    rows = x.numel() // k
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((rows, n), dtype=x.dtype)
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    name = _NAMES[x.dtype] if vnni or x.dtype != torch.bfloat16 else _FMA_BF16
    rc = getattr(cpu_build.library(_declare), name)(
        x2.data_ptr(), x2.stride(0), weight.data_ptr(), scale.data_ptr(), scale.shape[1],
        b.data_ptr() if b is not None else None, out.data_ptr(), out.stride(0), rows, n, k,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"int8_linear: shape outside the kernel's limits (rc={rc}): {n}x{k}, {scale.shape[1]} groups")  # fmt: skip
    return out.view(*x.shape[:-1], n)


def dequantize_bf16(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bf16(weight * scale)`` ``[N, K]`` in one pass, bit-equal to
    ``engine.quant.ops.dequantize(weight, scale, torch.bfloat16)`` when ``scale`` holds
    bf16 values (as a layer's ``kernel_scale`` does); see :func:`takes_weight`."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=torch.bfloat16)
    cpu_build.library(_declare).int8_dequant_bf16(
        weight.data_ptr(), scale.data_ptr(), scale.shape[1], out.data_ptr(), n, k,
        torch.get_num_threads(),
    )  # fmt: skip
    return out
