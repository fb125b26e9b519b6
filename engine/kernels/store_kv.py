"""``store_kv``: write one step's new K and V rows into their slots of the paged cache.

Cache layout (see ``engine/kv_cache/layout.py``), per layer, for K and for V::

    k_cache [num_blocks, block_size, num_kv_heads, head_dim]

    slot_mapping[t] = block * block_size + offset        (int64)

              token t ──► slot 37, block_size 16 ──► block 2, offset 5
    ┌─ block 0 ─┐┌─ block 1 ─┐┌──── block 2 ────┐
    │ 16 rows   ││ 16 rows   ││ o0 .. o5 .. o15 │   one row = [num_kv_heads, head_dim]
    └───────────┘└───────────┘└──────▲──────────┘
                                     └── key[t] lands here

One program per token copies its whole ``[num_kv_heads, head_dim]`` row for K and V.
A negative slot means "padding token, store nothing" (as in vLLM's CUDA-graph padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.torch_backend import store_kv_reference
from engine.kernels._launch import check_kv_dtype, check_launchable


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any float dtype, last dim contiguous
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], same as key
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], cache dtype
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], cache dtype
    slot_mapping_ptr,  # [num_tokens], int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,  # cache strides (K and V caches share them)
    stride_cs,
    stride_ch,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # Broadcast the slot before comparing: the interpreter rejects scalar-bool masks.
    slot_ok = (tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot) >= 0
    mask = (h < num_kv_heads) & (d < head_dim) & slot_ok

    k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    dst = block * stride_cb + offset * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _launch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` (``[N, Hkv, D]``) into ``k_cache``/``v_cache`` at ``slot_mapping``.

    ``slot_mapping`` is int64 ``[N]`` (negative = skip). Both caches are
    ``[num_blocks, block_size, Hkv, D]`` with the same strides and a contiguous head dim.
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must be [N, Hkv, D]"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"key rows {tuple(key.shape[1:])} do not match cache rows {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{key.shape[0]}]")
    check_kv_dtype(k_cache)
    check_launchable(_store_kv_kernel, key, k_cache)
    if key.shape[0] == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("key, value and the caches need a contiguous head dim (stride 1)")
    _launch(key, value, k_cache, v_cache, slot_mapping)


reference = store_kv_reference
"""The pure-torch reference this kernel is tested against."""
