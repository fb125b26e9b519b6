"""Production-sized shapes, compiled kernels only (``gpu`` marker; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, TOLERANCE, make_block_tables, make_cache, randn

from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.paged_decode_attention import reference as decode_reference
from engine.kernels.paged_prefill_attention import paged_prefill_attention
from engine.kernels.paged_prefill_attention import reference as prefill_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_long_context_decode(dtype, num_splits):
    seq_lens = [1, 4095, 4096, 9000, 16384, 333]
    block_size = 16
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 7
    k, v = make_cache(num_blocks, block_size, 8, 128, dtype, seed=1)
    tables = make_block_tables(seq_lens, block_size, num_blocks, seed=2)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn((len(seq_lens), 32, 128), dtype, seed=3)
    got = paged_decode_attention(query, k, v, tables, lens, 128**-0.5, num_splits=num_splits)
    want = decode_reference(query, k, v, tables, lens, 128**-0.5)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_long_chunked_prefill(dtype, block_size):
    ctx_lens, q_lens = [0, 2048, 511], [700, 512, 1]
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k, v = make_cache(num_blocks, block_size, 4, 64, dtype, seed=4)
    tables = make_block_tables(seq_lens, block_size, num_blocks, seed=5)
    starts = [0, 700, 1212, 1213]
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    query = randn((starts[-1], 16, 64), dtype, seed=6)
    got = paged_prefill_attention(query, k, v, qsl, ctx, tables, 0.125)
    want = prefill_reference(query, k, v, qsl, ctx, tables, 0.125)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
