"""paged_decode_attention (split-KV + reduce) vs the torch reference on random paged KV."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, TOLERANCE, make_block_tables, make_cache, randn

from engine.kernels.paged_decode_attention import paged_decode_attention, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, num_blocks=None):
    need = sum(-(-n // block_size) for n in seq_lens)
    num_blocks = num_blocks or need + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=1)
    tables = make_block_tables(seq_lens, block_size, num_blocks, seed=2)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn((len(seq_lens), num_heads, head_dim), dtype, seed=3)
    return query, k_cache, v_cache, tables, lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(2, 2, 64), (8, 2, 64), (6, 2, 64), (4, 1, 128)]
)
def test_decode_matches_reference(dtype, block_size, num_heads, num_kv_heads, head_dim):
    # Odd lengths, a length of 1, an exact block multiple and one just past it.
    seq_lens = [1, 37, block_size, block_size + 1, 70]
    query, k, v, tables, lens = _case(
        seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    got = paged_decode_attention(query, k, v, tables, lens, scale, num_splits=2)
    want = reference(query, k, v, tables, lens, scale)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_counts_agree(num_splits):
    """Single pass, uneven splits, and more splits than tiles (empty splits) all agree."""
    seq_lens = [5, 100, 33]
    query, k, v, tables, lens = _case(seq_lens, 4, 2, 64, 16, torch.float32)
    got = paged_decode_attention(query, k, v, tables, lens, 0.125, num_splits=num_splits)
    want = reference(query, k, v, tables, lens, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 7, 40])
def test_decode_sliding_window(dtype, window):
    seq_lens = [3, 50, 77]
    query, k, v, tables, lens = _case(seq_lens, 4, 2, 64, 16, dtype)
    got = paged_decode_attention(
        query, k, v, tables, lens, 0.125, sliding_window=window, num_splits=3
    )
    want = reference(query, k, v, tables, lens, 0.125, window)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_decode_strided_query_and_default_splits():
    """Query sliced from a fused projection (non-contiguous rows); heuristic split count."""
    seq_lens = [9, 64, 31, 2]
    _, k, v, tables, lens = _case(seq_lens, 4, 2, 64, 32, torch.float16)
    fused = randn((len(seq_lens), 6, 64), torch.float16, seed=9)
    query = fused[:, :4]
    got = paged_decode_attention(query, k, v, tables, lens, 0.125)
    want = reference(query, k, v, tables, lens, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float16])


def test_decode_rejects_bad_gqa_ratio():
    query, k, v, tables, lens = _case([4], 3, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention(query, k, v, tables, lens, 0.125)


def test_decode_small_head_dim_and_sliced_block_table():
    """Head dim 16 (the tiny test models) and a column-sliced block table view."""
    seq_lens = [20, 3]
    query, k, v, tables, lens = _case(seq_lens, 4, 2, 16, 16, torch.float32)
    wide = torch.cat([tables, torch.zeros_like(tables)], dim=1)
    got = paged_decode_attention(query, k, v, wide[:, : tables.shape[1]], lens, 0.25)
    want = reference(query, k, v, tables, lens, 0.25)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
