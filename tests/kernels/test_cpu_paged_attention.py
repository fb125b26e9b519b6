"""The compiled CPU paged-attention kernel and the CPU backend against the torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.attention.torch_backend import TorchAttentionBackend, paged_decode_reference
from engine.kernels import cpu_paged_attention as cpu_kernel
from engine.model_runner import build_metadata
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput
from tests.kernels.paged_cases import TOLERANCE, make_block_tables, make_cache, randn

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "window"),
    [(4, 4, 32, 16, None), (8, 2, 64, 16, None), (16, 8, 64, 32, 7), (6, 1, 128, 8, 40)],
)
def test_decode_rows_match_reference(dtype, heads, kv_heads, head_dim, block_size, window):
    seq_lens = [1, 5, block_size, block_size + 1, 3 * block_size - 1, 97]
    k_cache, v_cache = make_cache(64, block_size, kv_heads, head_dim, dtype, seed=1)
    tables = make_block_tables(seq_lens, block_size, 64, seed=2)
    # A strided query, as the fused QKV projection's split leaves it.
    qkv = randn((len(seq_lens), (heads + 2 * kv_heads) * head_dim), dtype, seed=3)
    query = qkv[:, : heads * head_dim].view(len(seq_lens), heads, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want = paged_decode_reference(query, k_cache, v_cache, tables, lens, 0.2, window)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):  # tasks split kv heads into runs when rows are few per thread
            torch.set_num_threads(n)
            got = cpu_kernel.paged_attention_rows(
                query, k_cache, v_cache, tables, lens, 0.2, window
            )
            torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    finally:
        torch.set_num_threads(threads)


def _step(block_size: int, specs: list[tuple[int, int]]) -> SchedulerOutput:
    """Sequences given as (cached context, new tokens); 1-token ones first (decodes)."""
    seqs, next_block = [], 1
    for i, (ctx, n) in enumerate(specs):
        blocks = -(-(ctx + n) // block_size)
        ids = tuple(range(next_block + blocks - 1, next_block - 1, -1))  # not contiguous
        next_block += blocks
        seqs.append(
            ScheduledSequence(f"r{i}", (7,) * n, ctx, ids, True, SamplingParams(max_tokens=1))
        )
    return SchedulerOutput(tuple(seqs), sum(1 for _, n in specs if n == 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_backend_kernel_path_matches_gather_reference(dtype, window):
    """Decodes, a fresh prefill and prefills over a cached prefix in one step."""
    bs, heads, kv_heads, dim = 8, 8, 2, 64
    meta = build_metadata(_step(bs, [(40, 1), (3, 1), (0, 13), (9, 5), (16, 20)]), bs, "cpu")
    n = int(meta.query_start_loc[-1])
    k_cache, v_cache = make_cache(64, bs, kv_heads, dim, dtype, seed=4)
    query = randn((n, heads, dim), dtype, seed=5)
    key, value = randn((n, kv_heads, dim), dtype, seed=6), randn((n, kv_heads, dim), dtype, 7)
    backend = TorchAttentionBackend()
    backend.store_kv(key, value, k_cache, v_cache, meta)
    got = backend.forward(
        query, k_cache, v_cache, meta, scale=0.125, sliding_window=window, key=key, value=value
    )
    want = backend.reference(query, k_cache, v_cache, meta, 0.125, window)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_shapes_past_the_kernel_limits_fall_back_to_the_reference():
    assert not cpu_kernel.supports(torch.float32, 64, 1, 64, 16)  # group 64 > 32
    assert not cpu_kernel.supports(torch.float16, 4, 4, 64, 16)
    meta = build_metadata(_step(16, [(20, 1), (0, 4)]), 16, "cpu")
    k_cache, v_cache = make_cache(8, 16, 1, 64, torch.float32, seed=8)
    query, kv = randn((5, 64, 64), torch.float32, 9), randn((5, 1, 64), torch.float32, 10)
    backend = TorchAttentionBackend()
    got = backend.forward(query, k_cache, v_cache, meta, scale=0.1, key=kv, value=kv)
    want = backend.reference(query, k_cache, v_cache, meta, 0.1)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
