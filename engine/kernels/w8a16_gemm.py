"""``w8a16_linear``: ``y = x @ (w * scale)^T`` with 8-bit weights read directly (INT8 or
FP8 e4m3) and 16/32-bit activations, for CUDA (Triton).

Layout (row-major, as the checkpoint stores them)::

    x      [M, K]   bf16/fp16/fp32      one row per token
    w      [N, K]   int8 / float8_e4m3  output channel n = row n
    scale  [N, G]   fp32                G = 1 (per-channel) or K // group_size
    y      [M, N]   x.dtype

         K ──────────────►                  each program: a BLOCK_M x BLOCK_N tile of y,
    x  ┌──┬──┬──┐   w^T ┌──┐                walking K in BLOCK_K steps; the weight tile
       │  │  │  │       ├──┤  n ─►           is converted to fp32 and multiplied by its
       └──┴──┴──┘       ├──┤                 group's scale before the dot (a group never
                        └──┘                 straddles a K step: BLOCK_K divides group)

The dot runs on fp32 tiles: exact under the interpreter (its bf16 ``tl.dot`` is wrong)
and the weight's 8 bits lose nothing there. The weight bytes, not the flops, bound a
decode step, and those are half of bf16's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import check_launchable


@triton.jit
def _w8a16_kernel(
    x_ptr,  # [M, K] activations, row-major
    w_ptr,  # [N, K] int8 or float8e4nv, row-major
    s_ptr,  # [N, G] fp32 scales
    y_ptr,  # [M, N] output, x's dtype
    M,
    N,
    K,
    G,
    group_size,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(
            x_ptr + rm[:, None] * K + rk[None, :],
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        w_mask = (rn[None, :] < N) & (rk[:, None] < K)
        # No ``other=``: an FP8 pointer takes no integer fill; zero the lanes after the cast
        w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=w_mask)  # [BLOCK_K, BLOCK_N]
        w = tl.where(w_mask, w.to(tl.float32), 0.0)
        g = k0 // group_size
        s = tl.load(s_ptr + rn * G + g, mask=rn < N, other=0.0)
        acc += tl.dot(x, w * s[None, :], input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _block_k(group_size: int) -> int:
    block = 64
    while group_size % block:
        block //= 2
    return block


def w8a16_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch reference: dequantize in fp32, multiply, return in ``x.dtype``."""
    n, k = w.shape
    wf = w.to(torch.float32).view(n, scale.shape[1], -1) * scale[:, :, None]
    return (x.to(torch.float32) @ wf.view(n, k).t()).to(x.dtype)


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., K] @ (w [N, K] * scale [N, G])^T (+ bias)`` in ``x.dtype``."""
    check_launchable(_w8a16_kernel, x, w, scale)
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    group = k // scale.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _w8a16_kernel[grid](
        x2, w, scale.contiguous(), y, m, n, k, scale.shape[1], group,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=_block_k(group),
    )  # fmt: skip
    y = y.view(*x.shape[:-1], n)
    return y + bias if bias is not None else y
