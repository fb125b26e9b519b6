"""A quantized KV cache over every backend: pages and their scales move byte for byte,
at about half of bf16's bytes per token, and a P/D KV dtype mismatch is refused."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.layout import KVLayout, gather_blocks
from engine.kv_cache.quant import FORMATS
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import HandshakeError, TransferState, make_client, make_endpoint

from .conftest import FAST, NUM_BLOCKS, BlockPool, allocate_dst, backend_name, wait_until

QUANT = sorted(FORMATS)


def layout(kv_cache_dtype: str, dtype: torch.dtype = torch.bfloat16) -> KVLayout:
    return KVLayout(3, NUM_BLOCKS, 4, 2, 16, dtype, kv_cache_dtype=kv_cache_dtype)


def quantized_caches(lay: KVLayout, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real quantized pages (values and scales) of random K/V."""
    g, fmt = torch.Generator().manual_seed(seed), FORMATS[lay.kv_cache_dtype]
    shape = (lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
    return [
        tuple(fmt.quantize(torch.randn(shape, generator=g) * 3) for _ in "kv")
        for _ in range(lay.num_layers)
    ]


@pytest.fixture
def endpoints(backend):
    """``open(kv_cache_dtype)`` -> (layout, spec, pool, endpoint, dst); checks for leaks."""
    made = []

    def open_(kv_cache_dtype: str):
        lay = layout(kv_cache_dtype)
        spec = KVLayoutSpec.from_layout(lay, "test-model")
        kv_pool, dst = allocate_dst(backend, lay)  # shm: the shared pool, written in place
        pool = BlockPool(NUM_BLOCKS)
        endpoint = make_endpoint(backend_name(backend), lay, dst, spec, pool.free, config=FAST)
        made.append((pool, endpoint, kv_pool))
        return lay, spec, pool, endpoint, dst

    yield open_
    for pool, endpoint, kv_pool in made:
        endpoint.close()
        if kv_pool is not None:
            kv_pool.close()
        assert pool.num_free == pool.total, f"{pool.total - pool.num_free} KV blocks leaked"


def _transfer(backend, lay, spec, pool, endpoint, src, n) -> tuple[list[int], list[int]]:
    dst_ids, src_ids = pool.allocate(n), list(range(3, 3 + 2 * n, 2))
    client = make_client(backend_name(backend), spec, config=FAST)
    try:
        rx = endpoint.expect(dst_ids, lease_s=10)
        tx = client.open(rx.ticket)
        for layer, (k, v) in enumerate(src):
            tx.send_layer(layer, k, v, src_block_ids=src_ids)
        tx.finish()
        wait_until(lambda: rx.poll().terminal and tx.poll().terminal)
        assert (rx.poll(), tx.poll()) == (TransferState.SUCCESS,) * 2, (rx.error, tx.error)
    finally:
        client.close()
    return src_ids, dst_ids


@pytest.mark.parametrize("kv_cache_dtype", QUANT)
def test_quant_kv_pages_and_scales_move_as_they_are(backend, endpoints, kv_cache_dtype):
    """Every byte of the quantized pages (values and scales) arrives unchanged, and the
    bytes the receiver counts per token are bf16's x (head_dim + 2) / (2 x head_dim)."""
    lay, spec, pool, endpoint, dst = endpoints(kv_cache_dtype)
    src = quantized_caches(lay, seed=1)
    n = 5
    src_ids, dst_ids = _transfer(backend, lay, spec, pool, endpoint, src, n)
    fmt = FORMATS[kv_cache_dtype]
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        for s, d in ((sk, dk), (sv, dv)):
            assert torch.equal(gather_blocks(d, dst_ids), gather_blocks(s, src_ids))
            got = fmt.dequantize(gather_blocks(d, dst_ids), torch.float32)
            assert got.abs().max() > 1.0  # the scales came too: values, not raw codes / 0
    tokens = n * lay.block_size
    per_token = endpoint.stats()["received_bytes"] / tokens
    bf16 = layout("auto").bytes_per_token
    assert per_token == lay.bytes_per_token == spec.bytes_per_token
    assert per_token / bf16 == (16 + 2) / 32
    pool.free(dst_ids)


@pytest.mark.parametrize(("prefill", "decode"), [("fp8_e4m3", "auto"), ("int8", "fp8_e5m2")])
def test_quant_kv_dtype_mismatch_is_refused_at_pairing(backend, endpoints, prefill, decode):
    """A prefill worker with another KV dtype than its decode worker is refused at the
    handshake, naming both; nothing is reserved, so no block can leak."""
    *_, endpoint, _ = endpoints(decode)
    theirs = KVLayoutSpec.from_layout(layout(prefill), "test-model")
    client = make_client(backend_name(backend), theirs, config=FAST)
    want = f"kv_cache_dtype mismatch: decode={decode}, prefill={prefill}"
    try:
        with pytest.raises(HandshakeError, match=want) as err:
            client.connect(endpoint.address)
        assert "--kv-cache-dtype" in str(err.value)
    finally:
        client.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 1)
