"""KV transfers between TP groups of different sizes, on every backend: the part plan
(kv_transfer/tp_map.py), each decode rank receiving exactly its heads rank to rank from
the prefill ranks that hold them (written into their place in each block), and pairing
refusing a layout that cannot be mapped, naming both sides."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.layout import KVLayout, kv_head_range
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import HandshakeError, TransferState, make_client, make_endpoint
from kv_transfer.tp_map import Part, plan_parts

from .conftest import FAST, NUM_BLOCKS, BlockPool, allocate_dst, backend_name, wait_until

HEADS, LAYERS = 4, 3
S = TransferState


def test_tensor_parallel_part_plans():
    assert plan_parts(4, 2, 2) == [Part(0, 0, (0, 2)), Part(1, 1, (2, 4))]
    assert plan_parts(4, 1, 2) == [Part(0, 0, (0, 2)), Part(0, 1, (2, 4))]
    assert plan_parts(4, 2, 1) == [Part(0, 0, (0, 2)), Part(1, 0, (2, 4))]
    assert plan_parts(4, 4, 2) == [Part(0, 0, (0, 1)), Part(1, 0, (1, 2)), Part(2, 1, (2, 3)), Part(3, 1, (3, 4))]  # fmt: skip
    # One KV head replicated on both ranks: each decode rank from "its" prefill rank.
    assert plan_parts(1, 2, 2) == [Part(0, 0, (0, 1)), Part(1, 1, (0, 1))]
    assert plan_parts(1, 1, 2) == [Part(0, 0, (0, 1)), Part(0, 1, (0, 1))]
    assert plan_parts(1, 2, 1) == [Part(0, 0, (0, 1))]
    with pytest.raises(ValueError, match="decode tp_size=3 cannot hold 4 KV heads"):
        plan_parts(4, 2, 3)


def _layout(heads: int) -> KVLayout:
    return KVLayout(LAYERS, NUM_BLOCKS, 4, heads, 8, torch.float32)


def _spec(tp_size: int, rank: int) -> KVLayoutSpec:
    group = KVLayoutSpec.from_layout(_layout(HEADS), "tp-model")
    return group.for_rank(tp_size, rank, kv_head_range(HEADS, tp_size, rank))


def _reference() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [tuple(torch.randn(_layout(HEADS).cache_shape, generator=g) for _ in range(2)) for _ in range(LAYERS)]  # fmt: skip


class Group:
    """One side's ranks: their caches (their heads of the reference) and specs."""

    def __init__(self, tp_size: int, ref) -> None:
        self.tp_size = tp_size
        self.specs = [_spec(tp_size, r) for r in range(tp_size)]
        self.caches = [
            [
                (
                    k[:, :, s.head_start : s.head_end].clone(),
                    v[:, :, s.head_start : s.head_end].clone(),
                )
                for k, v in ref
            ]  # fmt: skip
            for s in self.specs
        ]


def _transfer(variant: str, prefill_tp: int, decode_tp: int) -> None:
    """``variant`` shm: each decode rank's cache is a shared KV pool (a whole ticket would
    be written in place; parts go staged, kv_transfer/outgoing.py ``in_place``)."""
    ref, backend = _reference(), backend_name(variant)
    prefill, decode = Group(prefill_tp, ref), Group(decode_tp, ref)
    shared = [allocate_dst(variant, _layout(s.num_local_heads)) for s in decode.specs]
    decode.caches = [caches for _, caches in shared]
    for caches in decode.caches:
        for k, v in caches:
            k.zero_(), v.zero_()
    pools = [BlockPool(NUM_BLOCKS, seed=r) for r in range(decode_tp)]
    endpoints = [
        make_endpoint(
            backend, _layout(s.num_local_heads), decode.caches[r], s, pools[r].free, config=FAST
        )  # fmt: skip
        for r, s in enumerate(decode.specs)
    ]
    clients = [make_client(backend, s, config=FAST) for s in prefill.specs]
    try:
        dst = pools[0].allocate(5)
        for pool in pools[1:]:
            pool.allocate(5)  # every decode rank holds the same block ids (one scheduler)
        src = [7, 3, 11, 0, 9]
        pairs = []
        for part in plan_parts(HEADS, prefill_tp, decode_tp):
            rx = endpoints[part.dst_rank].expect(dst, 30, heads=part.heads, src_rank=part.src_rank)
            tx = clients[part.src_rank].open(rx.ticket)
            spec = prefill.specs[part.src_rank]
            a, b = part.heads[0] - spec.head_start, part.heads[1] - spec.head_start
            for layer, (k, v) in enumerate(prefill.caches[part.src_rank]):
                tx.send_layer(layer, k[:, :, a:b], v[:, :, a:b], src_block_ids=src)
            tx.finish()
            pairs.append((tx, rx))
        for tx, rx in pairs:
            wait_until(lambda tx=tx, rx=rx: tx.poll() is S.SUCCESS and rx.poll() is S.SUCCESS, 20)  # fmt: skip
        for r, s in enumerate(decode.specs):
            for (k, v), (rk, rv) in zip(decode.caches[r], ref, strict=True):
                h = slice(s.head_start, s.head_end)
                assert torch.equal(k[dst], rk[src][:, :, h]) and torch.equal(
                    v[dst], rv[src][:, :, h]
                )
    finally:
        for c in clients:
            c.close()
        for e in endpoints:
            e.close()
        for pool, _ in shared:
            if pool is not None:
                pool.close()


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_tensor_parallel_parts_move_rank_to_rank(backend, prefill_tp, decode_tp):
    _transfer(backend, prefill_tp, decode_tp)


def test_tensor_parallel_unmappable_layout_is_refused_naming_both_sides(backend):
    bad = KVLayoutSpec.from_layout(_layout(HEADS), "tp-model").for_rank(2, 0, (0, 4))
    pool = BlockPool(NUM_BLOCKS)
    backend = backend_name(backend)
    endpoint = make_endpoint(backend, _layout(HEADS), _layout(HEADS).allocate(), bad, pool.free, config=FAST)  # fmt: skip
    client = make_client(backend, _spec(2, 1), config=FAST)
    try:
        with pytest.raises(HandshakeError) as err:
            client.connect(endpoint.address)
        msg = str(err.value)
        assert "TP layouts cannot be mapped" in msg
        assert "decode tp_size=2 rank 0 holds KV heads [0, 4) of 4" in msg
        assert "prefill tp_size=2 rank 1 holds KV heads [2, 4) of 4" in msg
    finally:
        client.close()
        endpoint.close()


def test_tensor_parallel_part_a_rank_does_not_hold_fails_naming_both(backend):
    pool = BlockPool(NUM_BLOCKS)
    spec, backend = _spec(1, 0), backend_name(backend)
    endpoint = make_endpoint(backend, _layout(HEADS), _layout(HEADS).allocate(), spec, pool.free, config=FAST)  # fmt: skip
    client = make_client(backend, _spec(2, 0), config=FAST)  # holds heads 0-1 only
    try:
        rx = endpoint.expect(pool.allocate(2), 30, heads=(2, 4), src_rank=0)
        tx = client.open(rx.ticket)
        assert tx.poll() is S.FAILED
        assert "asks for KV heads [2, 4]" in tx.error and "prefill tp_size=2 rank 0" in tx.error
        assert "decode tp_size=1 rank 0" in tx.error
        rx.abort("the sender refused")
        wait_until(lambda: pool.num_free == NUM_BLOCKS)
    finally:
        client.close()
        endpoint.close()
