"""``paged_prefill_attention``: varlen causal attention of new prompt tokens over paged KV.

The step's K/V are stored first (``store_kv``), so every key, cached or new, is read
from the paged cache. Sequence ``s`` owns query rows ``query_start_loc[s] ..
query_start_loc[s+1]``; its row ``t`` sits at absolute position ``context_lens[s] + t``::

    query rows:  [ d0 d1 | a a a a a | b b b ]        query_start_loc = [.., 2, 7, 10]
                            │
    seq a:  positions 0 .. ctx-1 already cached (prefix hit / earlier chunk) ─┐
            positions ctx .. ctx+4 are this step's rows                        │
                                                                               ▼
    block_tables[a] = [ 4 | 11 | 6 | 0 ...]   position p ──► k_cache[bt[p // BS], p % BS]
                                              (block id cast to int64 before use)

    grid = (query tile of BLOCK_M rows, head, sequence)
    tile rows q_pos = ctx + tile*BLOCK_M + [0, BLOCK_M)
    keys visited:  [lo, last q_pos of the tile]      lo = 0, or window start
    mask: k_pos <= q_pos  (and k_pos > q_pos - window)

Rows of ``query`` outside every ``[query_start_loc[s], query_start_loc[s+1])`` (for
example the decode rows in front of the prefills) are not written. The online softmax
runs in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.torch_backend import paged_prefill_reference
from engine.kernels._launch import check_kv_dtype, check_launchable, upcast_dots

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_tokens, H, D], query dtype
    out_ptr,  # [num_tokens, H, D], query dtype
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D], cache dtype
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D], cache dtype, same strides as K
    query_start_loc_ptr,  # [S + 1], int32: row ranges into q/out
    context_lens_ptr,  # [S], int32: tokens cached before this step
    block_tables_ptr,  # [S, max_blocks], int32
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    qk_scale,  # softmax scale * log2(e)
    head_dim,
    group,  # query heads per KV head
    window,  # sliding window in tokens (ignored unless HAS_WINDOW)
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    kvh = h // group

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = ctx + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_rows = (q_start + rows).to(tl.int64)
    qo_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qo_mask, other=0.0
    )
    q = q.to(tl.float32) if UPCAST else q.to(k_cache_ptr.dtype.element_ty)

    # Keys up to the tile's last query position; nothing for tiles past this sequence.
    hi = tl.where(tile * BLOCK_M < q_len, ctx + tl.minimum((tile + 1) * BLOCK_M, q_len), 0)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(ctx + tile * BLOCK_M - window + 1, 0) // BLOCK_N) * BLOCK_N

    # A finite "minus infinity" keeps exp2(m_i - m_new) free of NaN on all-masked rows.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        k_valid = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
        keep = k_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            keep = keep & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p if UPCAST else p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qo_mask,
    )


def _launch(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    block_m: int,
    block_n: int,
) -> None:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_seqs = context_lens.shape[0]
    upcast = upcast_dots(_prefill_kernel, k_cache.dtype)
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        query, out, k_cache, v_cache, query_start_loc, context_lens, block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        scale * _LOG2E, head_dim, num_heads // k_cache.shape[2], sliding_window or 0,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs K >= 16
        HAS_WINDOW=sliding_window is not None,
        UPCAST=upcast,
        PRECISION="ieee" if upcast else "tf32",
    )  # fmt: skip


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention for the rows of ``query`` (``[num_tokens, H, D]``) that belong to
    the ``S`` sequences in ``query_start_loc`` (int32 ``[S + 1]``), each over its paged
    context (``context_lens`` int32 ``[S]``, ``block_tables`` int32 ``[S, max_blocks]``).

    Writes into ``out`` (default: a new ``empty_like(query)``) and returns it; rows outside
    every sequence are left as they were. ``max_query_len`` saves a device sync.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
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
    if query_start_loc.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries for "
            f"{context_lens.shape[0]} sequences; it needs one more than the sequence count"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    check_kv_dtype(k_cache)
    check_launchable(_prefill_kernel, query, k_cache)
    out = torch.empty_like(query) if out is None else out
    if context_lens.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    # 64x64 tiles on GPU; fp32 KV at 32x32 keeps K/V/Q tiles within shared memory.
    # The interpreter pays per program, so it gets mid-sized tiles.
    big = query.device.type == "cuda" and k_cache.dtype != torch.float32
    block_m = block_m or (64 if big else 32)
    block_n = block_n or (64 if big else 32)
    _launch(
        out, query, k_cache, v_cache, query_start_loc, context_lens, block_tables, scale,
        sliding_window, max_query_len, block_m, block_n,
    )  # fmt: skip
    return out


def reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Pure-torch varlen twin of :func:`paged_prefill_attention`, one sequence at a time
    (uncovered rows come back as zeros)."""
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    for s, ctx in enumerate(context_lens.tolist()):
        a, b = starts[s], starts[s + 1]
        if b > a:
            out[a:b] = paged_prefill_reference(
                query[a:b], k_cache, v_cache, block_tables[s], ctx, scale, sliding_window
            )
    return out
