"""paged_prefill_attention (varlen, causal, paged context) vs the torch reference."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, TOLERANCE, make_block_tables, make_cache, randn

from engine.kernels.paged_prefill_attention import paged_prefill_attention, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(ctx_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, lead=0):
    """Random paged KV for sequences of ``ctx + q`` tokens; ``lead`` uncovered rows first."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=4)
    tables = make_block_tables(seq_lens, block_size, num_blocks, seed=5)
    starts = [lead]
    for q in q_lens:
        starts.append(starts[-1] + q)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    query = randn((starts[-1], num_heads, head_dim), dtype, seed=6)
    return query, k_cache, v_cache, qsl, ctx, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(2, 2, 64), (4, 1, 64), (3, 1, 64), (2, 1, 128)]
)
def test_prefill_matches_reference(dtype, block_size, num_heads, num_kv_heads, head_dim):
    # Fresh prompt over two query tiles, a chunk after a cached prefix, a one-token
    # chunk, and a prefix-cache hit ending exactly on a block boundary.
    ctx_lens = [0, 19, 40, block_size]
    q_lens = [37, 5, 1, 9]
    query, k, v, qsl, ctx, tables = _case(
        ctx_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    got = paged_prefill_attention(query, k, v, qsl, ctx, tables, scale, max_query_len=37)
    want = reference(query, k, v, qsl, ctx, tables, scale)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (64, 16)])
def test_prefill_tile_shapes_agree(block_m, block_n):
    query, k, v, qsl, ctx, tables = _case([3, 0], [30, 17], 4, 2, 64, 16, torch.float32)
    got = paged_prefill_attention(
        query, k, v, qsl, ctx, tables, 0.125, block_m=block_m, block_n=block_n
    )
    want = reference(query, k, v, qsl, ctx, tables, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 6, 33])
def test_prefill_sliding_window(dtype, window):
    query, k, v, qsl, ctx, tables = _case([0, 25], [34, 8], 4, 2, 64, 16, dtype)
    got = paged_prefill_attention(query, k, v, qsl, ctx, tables, 0.125, sliding_window=window)
    want = reference(query, k, v, qsl, ctx, tables, 0.125, window)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_prefill_leaves_uncovered_rows_alone():
    """Rows in front of the first sequence (the decode rows of a step) keep their value."""
    query, k, v, qsl, ctx, tables = _case([7, 0], [4, 6], 2, 2, 64, 16, torch.float32, lead=3)
    out = torch.full_like(query, 5.0)
    paged_prefill_attention(query, k, v, qsl, ctx, tables, 0.125, out=out)
    want = reference(query, k, v, qsl, ctx, tables, 0.125)
    assert torch.equal(out[:3], torch.full_like(out[:3], 5.0))
    torch.testing.assert_close(out[3:], want[3:], **TOLERANCE[torch.float32])


def test_prefill_strided_query():
    query, k, v, qsl, ctx, tables = _case([5], [11], 4, 2, 64, 16, torch.bfloat16)
    fused = torch.cat([query, randn(query.shape, torch.bfloat16, seed=8)], dim=1)
    q_view = fused[:, :4]
    got = paged_prefill_attention(q_view, k, v, qsl, ctx, tables, 0.125)
    want = reference(query, k, v, qsl, ctx, tables, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])
