"""store_kv kernel vs the torch reference: exact copies into shuffled slots."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, make_cache, randn

from engine.kernels.store_kv import reference, store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 64)])
def test_store_kv_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    num_blocks, n = 6, 7
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=0)
    key = randn((n, num_kv_heads, head_dim), dtype, seed=1)
    value = randn((n, num_kv_heads, head_dim), dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].to(DEVICE)  # int64

    got_k, got_v = k_cache.clone(), v_cache.clone()
    store_kv(key, value, got_k, got_v, slots)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference(key, value, ref_k, ref_v, slots)
    assert torch.equal(got_k, ref_k)
    assert torch.equal(got_v, ref_v)


def test_store_kv_strided_input_and_downcast():
    """K/V sliced out of a fused QKV projection; fp32 activations into a bf16 cache."""
    k_cache, v_cache = make_cache(4, 16, 2, 64, torch.bfloat16, seed=0)
    qkv = randn((5, 3, 2, 64), torch.float32, seed=1)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([0, 17, 63, 5, 40], device=DEVICE)
    got_k, got_v = k_cache.clone(), v_cache.clone()
    store_kv(key, value, got_k, got_v, slots)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference(key, value, ref_k, ref_v, slots)
    # One bf16 ulp: the interpreter truncates fp32 -> bf16 where torch rounds to nearest.
    torch.testing.assert_close(got_k, ref_k, atol=0, rtol=2**-7)
    torch.testing.assert_close(got_v, ref_v, atol=0, rtol=2**-7)


def test_store_kv_skips_negative_slots():
    k_cache, v_cache = make_cache(2, 16, 1, 64, torch.float32, seed=0)
    key = randn((3, 1, 64), torch.float32, seed=1)
    slots = torch.tensor([4, -1, 9], device=DEVICE)
    got_k, got_v = k_cache.clone(), v_cache.clone()
    store_kv(key, key, got_k, got_v, slots)
    ref_k = k_cache.clone()
    keep = torch.tensor([0, 2], device=DEVICE)
    reference(key[keep], key[keep], ref_k, v_cache.clone(), slots[keep])
    assert torch.equal(got_k, ref_k)


def test_store_kv_rejects_shape_mismatch():
    k_cache, v_cache = make_cache(2, 16, 2, 64, torch.float32, seed=0)
    key = randn((3, 2, 128), torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not match cache rows"):
        store_kv(key, key, k_cache, v_cache, torch.arange(3, device=DEVICE))
