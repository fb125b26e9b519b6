"""``paged_decode_attention``: one query token per sequence over its paged KV (split-KV).

Block-table layout (``engine/kv_cache/layout.py``)::

    block_tables[b] = [ 7 | 2 | 9 | 0 ...]      int32, 0-padded past the last block
                        │   │   └──────────────► positions 2*BS .. 3*BS-1
                        │   └──────────────────► positions   BS .. 2*BS-1
                        └──────────────────────► positions    0 .. BS-1
    position p ──► k_cache[block_tables[b, p // BS], p % BS, kv_head, :]
                   (block id cast to int64 before it is multiplied into an offset)

Flash-decoding: the context of each sequence is cut into ``num_splits`` ranges of
``tokens_per_split`` positions (a multiple of ``BLOCK_N``)::

    grid = (batch, kv_head, split)
    seq b:  [── split 0 ──][── split 1 ──][── split 2 ──]...   (empty splits write m=-1e30, l=0)
              │               │               │
              ▼               ▼               ▼
          (m, l, acc)     (m, l, acc)     (m, l, acc)   fp32 scratch [B, H, S(, D)]
              └───────────────┴───────┬───────┘
                                      ▼
                 reduce kernel, grid (batch, head): out = Σ w_s acc_s / Σ w_s l_s

Each program handles all ``group = H / Hkv`` query heads of its KV head together, so K/V
pages are read once per GQA group. Scores live in the log2 domain (``exp2``); the online
softmax runs in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from engine.attention.torch_backend import paged_decode_reference
from engine.kernels._launch import check_kv_dtype, check_launchable, upcast_dots

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D], query dtype
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D], cache dtype
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D], cache dtype, same strides as K
    block_tables_ptr,  # [B, max_blocks], int32
    seq_lens_ptr,  # [B], int32
    part_m_ptr,  # [B, H, S], fp32: running max (log2 domain)
    part_l_ptr,  # [B, H, S], fp32: running sum of exp2
    part_acc_ptr,  # [B, H, S, D], fp32: unnormalised output
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    qk_scale,  # softmax scale * log2(e)
    head_dim,
    group,  # query heads per KV head
    tokens_per_split,  # multiple of BLOCK_N
    window,  # sliding window in tokens (ignored unless HAS_WINDOW)
    num_splits,  # runtime, so a new split count never triggers a recompile
    NUM_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g  # query heads of this GQA group
    g_mask = g < group
    d_mask = d < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q = q.to(tl.float32) if UPCAST else q.to(k_cache_ptr.dtype.element_ty)

    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(seq_len - window, 0) // BLOCK_N) * BLOCK_N)

    # A finite "minus infinity" keeps exp2(m_i - m_new) free of NaN on all-masked tiles.
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        if HAS_WINDOW:
            valid = valid & (pos >= seq_len - window)
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p if UPCAST else p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    part = (b * NUM_HEADS + heads) * num_splits + split  # [G] index into [B, H, S]
    tl.store(part_m_ptr + part, m_i, mask=g_mask)
    tl.store(part_l_ptr + part, l_i, mask=g_mask)
    tl.store(
        part_acc_ptr + part[:, None] * head_dim + d[None, :],
        acc,
        mask=g_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _decode_reduce_kernel(
    out_ptr,  # [B, H, D], query dtype
    part_m_ptr,  # [B, H, S], fp32
    part_l_ptr,  # [B, H, S], fp32
    part_acc_ptr,  # [B, H, S, D], fp32
    stride_ob,
    stride_oh,
    head_dim,
    num_splits,
    NUM_HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < head_dim
    row = (b * NUM_HEADS + h) * num_splits + s
    m_s = tl.load(part_m_ptr + row, mask=s_mask, other=-1.0e30)
    l_s = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * head_dim + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    w = tl.exp2(m_s - tl.max(m_s, 0))  # empty splits have l_s = 0 and acc = 0
    denom = tl.sum(w * l_s, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def _launch(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    tokens_per_split: int,
    block_n: int,
) -> None:
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(
        (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
    )
    upcast = upcast_dots(_decode_split_kernel, k_cache.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, part_m, part_l, part_acc,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        scale * _LOG2E, head_dim, group, tokens_per_split, sliding_window or 0, num_splits,
        NUM_HEADS=num_heads,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_WINDOW=sliding_window is not None,
        UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32",
    )  # fmt: skip
    _decode_reduce_kernel[(batch, num_heads)](
        out, part_m, part_l, part_acc,
        out.stride(0), out.stride(1), head_dim, num_splits,
        NUM_HEADS=num_heads,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_D=block_d,
    )  # fmt: skip


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device, *, block_n: int
) -> int:
    """Enough splits to give every SM a few programs, but never splits under 256 tokens,
    and at most 64 (the reduce kernel holds all splits' ``[D]`` partials in registers)."""
    # Interpreter: every program costs time, so split as little as possible.
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    wanted = math.ceil(4 * sms / max(1, batch * num_kv_heads))
    useful = math.ceil(max_seq_len / max(256, block_n))
    return max(1, min(wanted, useful, 64))


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, D]`` (one token per sequence, at position
    ``seq_lens[b] - 1``) over ``seq_lens[b]`` cached tokens found through ``block_tables``
    (int32 ``[B, max_blocks]``). Returns ``[B, H, D]`` in ``query``'s dtype.

    ``max_seq_len`` (an upper bound on ``seq_lens``) saves a device sync; ``num_splits``
    overrides the split-KV heuristic (1 = single pass); ``block_n`` is the KV tile.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {num_kv_heads}")
    if head_dim != k_cache.shape[3] or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"query head_dim {head_dim} vs cache {tuple(k_cache.shape)}; K and V caches must "
            "share shape and strides"
        )
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("query and the caches need a contiguous head dim (stride 1)")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    check_kv_dtype(k_cache)
    check_launchable(_decode_split_kernel, query, k_cache)
    out = torch.empty_like(query) if out is None else out
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    block_size = k_cache.shape[1]
    block_n = block_n or max(block_size, 16 if k_cache.device.type != "cuda" else 64)
    if num_splits is None:
        num_splits = choose_num_splits(
            batch, num_kv_heads, max_seq_len, query.device, block_n=block_n
        )
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    _launch(
        out, query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
        num_splits, tokens_per_split, block_n,
    )  # fmt: skip
    return out


reference = paged_decode_reference
"""The pure-torch reference this kernel is tested against."""
