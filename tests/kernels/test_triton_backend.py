"""The ``triton`` attention backend against the ``torch`` backend on whole mixed steps."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, TOLERANCE, make_block_tables, make_cache, randn

from engine.attention import AttentionMetadata, get_backend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
from engine.kv_cache.layout import slot_mapping_tensor


def _step(ctx_lens, q_lens, num_decodes, block_size, num_blocks):
    """Metadata for sequences with ``ctx_lens`` cached tokens and ``q_lens`` new ones."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    tables = make_block_tables(seq_lens, block_size, num_blocks, seed=7)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    slots = torch.cat(
        [
            slot_mapping_tensor(tables[i], torch.arange(c, c + q, device=DEVICE), block_size)
            for i, (c, q) in enumerate(zip(ctx_lens, q_lens, strict=True))
        ]
    )
    i32 = {"dtype": torch.int32, "device": DEVICE}
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(ctx_lens, **i32),
        block_tables=tables,
        slot_mapping=slots,
        num_decodes=num_decodes,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        seq_lens_cpu=tuple(seq_lens),
        context_lens_cpu=tuple(ctx_lens),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("sliding_window", [None, 9])
def test_mixed_step_matches_torch_backend(dtype, block_size, sliding_window):
    # Decodes (one at a block boundary), then a fresh prompt and a chunk after a prefix.
    ctx_lens, q_lens, num_decodes = [0, 31, block_size, 0, 20], [1, 1, 1, 13, 6], 3
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    num_blocks = 12
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=1)
    meta = _step(ctx_lens, q_lens, num_decodes, block_size, num_blocks)
    n = sum(q_lens)
    query = randn((n, num_heads, head_dim), dtype, seed=2)
    key = randn((n, num_kv_heads, head_dim), dtype, seed=3)
    value = randn((n, num_kv_heads, head_dim), dtype, seed=4)

    outs, caches = [], []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        k, v = k_cache.clone(), v_cache.clone()
        backend.store_kv(key, value, k, v, meta)
        outs.append(
            backend.forward(query, k, v, meta, scale=head_dim**-0.5, sliding_window=sliding_window)
        )
        caches.append((k, v))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(outs[0], outs[1], **TOLERANCE[dtype])


def test_decode_only_and_prefill_only_steps():
    k_cache, v_cache = make_cache(8, 16, 1, 64, torch.float32, seed=1)
    backend, ref = TritonAttentionBackend(), TorchAttentionBackend()
    for ctx_lens, q_lens, nd in (([4, 40], [1, 1], 2), ([0, 9], [17, 3], 0)):
        meta = _step(ctx_lens, q_lens, nd, 16, 8)
        query = randn((sum(q_lens), 2, 64), torch.float32, seed=5)
        got = backend.forward(query, k_cache, v_cache, meta, scale=0.125)
        want = ref.forward(query, k_cache, v_cache, meta, scale=0.125)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_registry_resolves_triton():
    assert get_backend("triton").name == "triton"
    assert isinstance(get_backend("auto", device="cuda"), TritonAttentionBackend)
