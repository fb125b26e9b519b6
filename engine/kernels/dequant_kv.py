"""``dequant_blocks``: gather blocks of a quantized KV cache and dequantize them.

Quantized cache layout (see ``engine/kv_cache/quant.py``), per layer, for K and for V::

    cache [num_blocks, block_size, num_kv_heads, head_dim + 2]   uint8

    one head row:  q[0] .. q[D-1] (fp8 e4m3 | fp8 e5m2 | int8) │ scale (bf16: lo, hi byte)

    block_ids = [7, 3]          out [2, block_size, num_kv_heads, head_dim]  (model dtype)
    ┌─ block 3 ─┐┌─ block 7 ─┐      out[0] = dq(cache[7])   out[1] = dq(cache[3])

One program per (listed block, token offset) dequantizes that token's every head:
``x = q * scale``, the scale rebuilt from its two bytes as the top half of an fp32.
The Triton attention backend of a quantized cache runs the paged attention kernels over
``out`` with the block tables renumbered into it (engine/attention/quant_triton_backend.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._launch import check_launchable
from engine.kv_cache.quant import SCALE_BYTES, KVQuantFormat

_CODES = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}


@triton.jit
def _dequant_blocks_kernel(
    cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim + 2], uint8, contiguous rows
    block_ids_ptr,  # [n], int64
    out_ptr,  # [n, block_size, num_kv_heads, head_dim], model dtype, contiguous
    stride_cb,  # cache strides in bytes (uint8 elements)
    stride_cs,
    stride_ch,
    stride_ob,  # out strides in elements
    stride_os,
    stride_oh,
    num_kv_heads,
    head_dim,
    FORMAT: tl.constexpr,  # 0 fp8 e4m3, 1 fp8 e5m2, 2 int8
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offset = tl.program_id(1).to(tl.int64)
    block = tl.load(block_ids_ptr + i).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    row = cache_ptr + block * stride_cb + offset * stride_cs + h * stride_ch
    raw = tl.load(row + d, mask=mask, other=0)
    if FORMAT == 0:
        q = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif FORMAT == 1:
        q = raw.to(tl.float8e5, bitcast=True).to(tl.float32)
    else:
        q = raw.to(tl.int8, bitcast=True).to(tl.float32)
    hmask = h < num_kv_heads
    lo = tl.load(row + head_dim, mask=hmask, other=0).to(tl.int32)
    hi = tl.load(row + head_dim + 1, mask=hmask, other=0).to(tl.int32)
    scale = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)  # bf16 = fp32's top half
    x = q * scale
    dst = out_ptr + i * stride_ob + offset * stride_os + h * stride_oh + d
    tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor, code: int) -> None:
    n, block_size, heads, head_dim = out.shape
    if n == 0:
        return
    _dequant_blocks_kernel[(n, block_size)](
        cache, block_ids, out,
        cache.stride(0), cache.stride(1), cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, head_dim,
        FORMAT=code,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def dequant_blocks(
    fmt: KVQuantFormat, cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks ``block_ids`` (int64 ``[n]``) of a packed quantized cache, dequantized to
    ``[n, block_size, Hkv, head_dim]`` in ``dtype`` (the Triton twin of
    ``engine.kv_cache.quant.dequantize_blocks``)."""
    if cache.dtype != torch.uint8 or cache.stride(-1) != 1:
        raise ValueError(f"a quantized cache is uint8 with contiguous rows, got {cache.dtype}")
    check_launchable(_dequant_blocks_kernel, cache, block_ids)
    blocks, block_size, heads, row = cache.shape
    ids = block_ids.to(device=cache.device, dtype=torch.int64).contiguous()
    out = torch.empty(
        (ids.numel(), block_size, heads, row - SCALE_BYTES), dtype=dtype, device=cache.device
    )
    _launch(cache, ids, out, _CODES[fmt.name])
    return out
