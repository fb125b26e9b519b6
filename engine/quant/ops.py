"""The matmuls of a quantized linear layer, per device.

Weights are ``[out, in]`` int8 or FP8 e4m3 with fp32 scales ``[out, 1]`` (per-channel;
a per-tensor scale is broadcast to every row at load) or ``[out, in // group]``.

CPU
    INT8 (per-channel or groups of a multiple of 16 columns), bf16/fp32 activations, up
        to ``INT8_KERNEL_MAX_ROWS`` rows (decode): the C kernel of
        engine/kernels/cpu_int8_linear.py (reads the int8 matrix once, directly: half
        the bytes of bf16, which is what a decode step is bound by). Its cost grows with
        the rows, so a prefill chunk dequantizes once and runs the dense GEMM.
    INT8 per-channel, bf16, few rows, where that kernel is not built (no AVX-512):
        ``torch._weight_int8pack_mm`` (up to ``INT8PACK_MAX_ROWS`` rows).
    FP8: no CPU multiplies FP8, so the weight is dequantized once at load into the
        model dtype and oneDNN's prepacked layout (engine/quant/linear.py): the same
        product as dequantizing per call, at dense speed and with dense bytes. FP8 on a
        CPU is for running FP8 checkpoints, not for saving memory.
    Everything else INT8: dequantize the layer's weight per call, then the dense GEMM.
    FP8 W8A8 dynamic: the activations are quantized to FP8 and back per token
        (emulated: the CPU has no FP8 GEMM), so the result is the one a GPU's
        ``torch._scaled_mm`` computes, without its speed.
CUDA
    W8A16 (INT8 or FP8 weights): the Triton GEMM of engine/kernels/w8a16_gemm.py.
    FP8 W8A8 dynamic on compute capability >= 8.9: ``torch._scaled_mm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import cpu_int8_linear

INT8PACK_MAX_ROWS = 8
INT8_KERNEL_MAX_ROWS = 8
"""The kernel is faster than dequantize + GEMM up to ~32 rows (bench/RESULTS.md), but it
applies the scale after the exact sum, as CPU int8 kernels do, where HF (and a GPU
W8A16 kernel) rounds every dequantized weight to bf16 first: on the tiny random models
that flips enough greedy tokens, with 32-sequence decode batches in the kernel, to fail
the 90% agreement with HF (12/32 at a limit of 32 rows; >= 90% at 4, 8 and 16)."""
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` ``[out, in]`` computed in ``dtype``, the scale first rounded to
    it, as compressed-tensors dequantizes (8-bit values are exact in bf16 and fp16; a
    real checkpoint's scales are already in the model dtype)."""
    out, cols = weight.shape
    groups = scale.shape[1]
    w = weight.view(out, groups, cols // groups).to(dtype)
    return (w * scale.to(dtype)[:, :, None]).view(out, cols)


def fp8_quantize_acts(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ~= x_fp8 * scale``; scale ``[rows, 1]`` or ``[1, 1]``
    in ``x.dtype``, computed there as compressed-tensors computes dynamic scales."""
    amax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax().reshape(1, 1)
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quant_fp8_acts(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """``x`` through FP8 and back (what an FP8 W8A8 GEMM sees of its input)."""
    q, scale = fp8_quantize_acts(x, per_token)
    return q.to(x.dtype) * scale


def cpu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    packed_scale: torch.Tensor | None = None,
    kernel_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPU product ``x @ (weight * scale)^T (+ bias)``; ``kernel_scale`` (fp32, as
    :func:`cpu_int8_linear.takes_weight` checked it) enables the C kernel,
    ``packed_scale`` (bf16 ``[out]``) torch's int8 packed kernel."""
    rows = x.numel() // x.shape[-1]
    if (
        kernel_scale is not None
        and rows <= INT8_KERNEL_MAX_ROWS
        and cpu_int8_linear.takes_activations(x)
    ):
        return cpu_int8_linear.int8_linear(x, weight, kernel_scale, bias)
    if kernel_scale is not None and x.dtype == torch.bfloat16:
        return F.linear(x, cpu_int8_linear.dequantize_bf16(weight, kernel_scale), bias)
    if packed_scale is not None and x.dtype == torch.bfloat16 and rows <= INT8PACK_MAX_ROWS:
        y = torch._weight_int8pack_mm(x.reshape(rows, -1), weight, packed_scale)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y + bias if bias is not None else y
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


def scaled_mm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool,
) -> torch.Tensor:
    """FP8 W8A8 on a GPU that has FP8 tensor cores (``torch._scaled_mm``, row-wise scales)."""
    rows = x.numel() // x.shape[-1]
    xq, xs = fp8_quantize_acts(x.reshape(rows, -1), per_token)
    xs = xs.float()
    if not per_token:
        xs = xs.expand(rows, 1)
    y = torch._scaled_mm(
        xq,
        weight.t(),
        scale_a=xs.contiguous(),
        scale_b=scale.reshape(1, -1).contiguous(),
        bias=bias,
        out_dtype=x.dtype,
    )
    return y.view(*x.shape[:-1], weight.shape[0])


def has_fp8_mm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
