"""The conformance suite: every backend must pass every test here (see conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.kv_cache.layout import gather_blocks
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import HandshakeError, KVReceiver, KVSender, TransferState, make_client

from .conftest import FAST, wait_until

S = TransferState


def send_layers(pair, tx, src_ids, layers=None, pages=False) -> None:
    for layer in range(pair.layout.num_layers) if layers is None else layers:
        k, v = pair.src[layer]
        if pages:
            tx.send_layer(layer, gather_blocks(k, src_ids), gather_blocks(v, src_ids))
        else:
            tx.send_layer(layer, k, v, src_block_ids=src_ids)


def assert_copied(pair, src_ids, dst_ids) -> None:
    for layer in range(pair.layout.num_layers):
        for kv in (0, 1):
            got = gather_blocks(pair.dst[layer][kv], dst_ids)
            want = gather_blocks(pair.src[layer][kv], src_ids)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (layer, kv)


def both_done(rx, tx) -> bool:
    return rx.poll().terminal and tx.poll().terminal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pages", [False, True], ids=["gather", "pages"])
def test_round_trip_bit_exact(make_pair, dtype, pages):
    pair = make_pair(dtype=dtype)
    dst_ids = pair.pool.allocate(7)
    src_ids = [40, 3, 17, 9, 60, 1, 33]
    rx = pair.endpoint.expect(dst_ids, lease_s=10)
    tx = pair.client.open(rx.ticket)
    assert isinstance(rx, KVReceiver) and isinstance(tx, KVSender)
    send_layers(pair, tx, src_ids, pages=pages)
    tx.finish()
    wait_until(lambda: both_done(rx, tx))
    assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
    assert_copied(pair, src_ids, dst_ids)
    untouched = sorted(set(range(pair.layout.num_blocks)) - set(dst_ids))
    assert not pair.dst[0][0][untouched].any(), "a block outside the ticket was written"
    pair.pool.free(dst_ids)  # the decode engine owns them after SUCCESS


@pytest.mark.parametrize(
    "src, dst, into_blocks",
    [
        (list(range(10, 18)), list(range(30, 38)), True),  # one run on both sides
        ([5, 6, 7, 20, 2, 40, 41, 42], [50, 51, 52, 9, 60, 11, 12, 13], True),  # and strays
        (list(range(3, 11)), [8, 1, 33, 20, 47, 2, 61, 15], False),  # only the source's run
        ([8, 1, 33, 20, 47, 2, 61, 15], list(range(3, 11)), True),  # only the destination's
    ],
    ids=["one-run", "runs-and-strays", "src-run", "dst-run"],
)
def test_runs_of_blocks_move_bit_exact(make_pair, monkeypatch, src, dst, into_blocks):
    """Runs consecutive on both sides go straight from and into the caches on the chunked
    backends (messages.py), mixed with staged messages in one layer, and a side whose ids
    of a message are consecutive skips its copy; every backend moves them bit for bit, and
    nothing outside the ticket is touched."""
    import kv_transfer.intake as intake

    straight: list[int] = []  # messages received straight into the cache, per descriptor
    real = intake.PageIntake._targets

    def targets(self, desc, plan):
        got = real(self, desc, plan)
        straight.append(sum(t is not None for t in got))
        return got

    monkeypatch.setattr(intake.PageIntake, "_targets", targets)
    pair = make_pair()
    pair.pool.take(dst)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, src)
    wait_until(lambda: both_done(rx, tx))
    assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
    assert_copied(pair, src, dst)
    untouched = sorted(set(range(pair.layout.num_blocks)) - set(dst))
    assert not pair.dst[0][0][untouched].any(), "a block outside the ticket was written"
    if pair.backend in ("torch_dist", "ucx"):
        assert (sum(straight) > 0) == into_blocks, straight
    pair.pool.free(dst)


def test_concurrent_transfers(make_pair):
    pair = make_pair(dtype=torch.bfloat16)
    other = make_client(pair.backend, pair.spec, config=FAST)
    try:
        jobs = []
        for i in range(4):
            dst = pair.pool.allocate(3 + i)
            rx = pair.endpoint.expect(dst, lease_s=10)
            tx = (pair.client if i % 2 else other).open(rx.ticket)
            jobs.append((rx, tx, list(range(10 * i, 10 * i + 3 + i)), dst))
        for layer in range(pair.layout.num_layers):  # interleave every transfer, layer by layer
            for _, tx, src, _ in jobs:
                send_layers(pair, tx, src, layers=[layer])
        for rx, tx, src, dst in jobs:
            tx.finish()
            wait_until(lambda rx=rx, tx=tx: both_done(rx, tx))
            assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
            assert_copied(pair, src, dst)
            pair.pool.free(dst)
    finally:
        other.close()


def test_layers_arrive_one_by_one(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(5)
    rx = pair.endpoint.expect(dst, lease_s=10)
    assert rx.poll() is S.BOOTSTRAPPING
    tx = pair.client.open(rx.ticket)
    wait_until(lambda: rx.poll() is S.WAITING and tx.poll() is S.WAITING)
    order = [2, 0, 3, 1]
    for n, layer in enumerate(order, start=1):
        send_layers(pair, tx, list(range(5)), layers=[layer])
        wait_until(lambda n=n: len(rx.layers_arrived()) == n)
        assert rx.layers_arrived() == order[:n]
        expected = S.SUCCESS if n == len(order) else S.TRANSFERRING
        assert rx.poll() is expected
    tx.finish()
    wait_until(lambda: tx.poll() is S.SUCCESS)
    pair.pool.free(dst)


def test_sender_abort(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(4)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [0, 1, 2, 3], layers=[0])
    wait_until(lambda: rx.layers_arrived() == [0])
    tx.abort("client went away")
    assert tx.poll() is S.FAILED and "client went away" in tx.error
    wait_until(lambda: rx.poll() is S.FAILED)
    assert "aborted by sender: client went away" in rx.error
    wait_until(lambda: pair.pool.num_free == pair.pool.total)
    send_layers(pair, tx, [0, 1, 2, 3], layers=[1])  # ignored after abort
    assert rx.layers_arrived() == [0]


def test_receiver_abort_drops_late_pages(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(4)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [0, 1, 2, 3], layers=[0])
    wait_until(lambda: rx.layers_arrived() == [0])
    before = pair.dst[1][0].clone()
    rx.abort("request cancelled")
    assert rx.poll() is S.FAILED
    wait_until(lambda: pair.pool.num_free == pair.pool.total)
    wait_until(lambda: tx.poll() is S.FAILED)
    assert "request cancelled" in tx.error
    # A layer already in flight when the abort landed is dropped and counted, never written.
    tx._terminal = None  # simulate the race: the sender has not seen the abort yet
    send_layers(pair, tx, [0, 1, 2, 3], layers=[1])
    wait_until(lambda: pair.endpoint.stats()["dropped_pages"] == 2 * 4)  # K and V of 4 blocks
    assert torch.equal(pair.dst[1][0], before)


def test_lease_expiry_frees_blocks(make_pair):
    pair = make_pair()
    pair.client.connect(pair.endpoint.address)  # pair first: ucx pairing can outlast 0.3 s
    dst = pair.pool.allocate(6)
    rx = pair.endpoint.expect(dst, lease_s=0.3)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, list(range(6)), layers=[0])
    waited = wait_until(lambda: rx.poll() is S.FAILED, timeout=3)
    assert waited < 2 and "lease expired" in rx.error
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=1)
    wait_until(lambda: tx.poll() is S.FAILED)
    assert "lease expired" in tx.error
    before = pair.dst[2][1].clone()
    tx._terminal = None  # a layer the sender sent before it heard of the expiry
    send_layers(pair, tx, list(range(6)), layers=[2])
    wait_until(lambda: pair.endpoint.stats()["dropped_pages"] == 2 * 6)
    assert torch.equal(pair.dst[2][1], before), "a page of an expired transfer was written"
    late = pair.client.open(rx.ticket)  # a sender that shows up after expiry is refused
    wait_until(lambda: late.poll() is S.FAILED)
    # (a pool's fence refuses it before it is opened: the blocks are no longer its own)
    why = "no longer its own" if pair.variant == "shm" else "unknown or finished transfer"
    assert why in late.error


def test_stale_epoch_is_refused(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(2)
    rx = pair.endpoint.expect(dst, lease_s=10)
    stale = rx.ticket.__class__(**{**rx.ticket.__dict__, "epoch": rx.ticket.epoch - 1})
    tx = pair.client.open(stale)
    assert tx.poll() is S.FAILED and "epoch" in tx.error
    rx.abort()
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=1)


def test_new_epoch_never_reuses_the_old_link(make_pair):
    """The receiver restarted at the same address (new epoch) before the sender noticed:
    the old connection is closed, a fresh one pairs, the transfer succeeds."""
    pair = make_pair()
    first = pair.endpoint.expect(pair.pool.allocate(1), lease_s=10)
    pair.client.connect(first.ticket.endpoint)
    old = pair.client._links[first.ticket.endpoint]
    first.abort()
    pair.endpoint.epoch = first.ticket.epoch + 1  # a new incarnation at the same address
    dst = pair.pool.allocate(2)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    new = pair.client._links[rx.ticket.endpoint]
    assert new is not old and new.epoch == rx.ticket.epoch
    wait_until(lambda: old.link.closed)
    send_layers(pair, tx, [0, 1])
    tx.finish()
    wait_until(lambda: both_done(rx, tx))
    assert rx.poll() is S.SUCCESS, rx.error
    assert_copied(pair, [0, 1], dst)
    pair.pool.free(dst)


def test_receiver_refuses_a_transfer_of_another_epoch(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(2)
    rx = pair.endpoint.expect(dst, lease_s=10)
    pair.client.connect(rx.ticket.endpoint)  # paired with the old incarnation
    pair.endpoint.epoch = rx.ticket.epoch + 1  # the endpoint is now another incarnation
    tx = pair.client.open(rx.ticket)
    wait_until(lambda: tx.poll() is S.FAILED)
    assert f"carries epoch {rx.ticket.epoch}, which is not this endpoint's epoch" in tx.error
    assert "reserve again" in tx.error
    rx.abort()
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 8, "block_size mismatch: decode=4, prefill=8"),
        ("dtype", "bfloat16", "dtype mismatch: decode=float32, prefill=bfloat16"),
        ("model_fingerprint", "other-model", "model_fingerprint mismatch"),
        ("protocol_version", 99, "protocol_version mismatch: decode=1, prefill=99"),
    ],
)
def test_layout_mismatch_is_refused(make_pair, field, value, message):
    pair = make_pair()
    theirs = KVLayoutSpec(**{**pair.spec.__dict__, field: value})
    client = make_client(pair.backend, theirs, config=FAST)
    try:
        with pytest.raises(HandshakeError, match=message):
            client.connect(pair.endpoint.address)
    finally:
        client.close()
    wait_until(lambda: pair.endpoint.stats()["refused_pairings"] == 1)


def test_backend_mismatch_is_refused(make_pair):
    pair = make_pair()
    other = "shm" if pair.backend == "tcp" else "tcp"
    client = make_client(other, pair.spec, config=FAST)
    try:
        with pytest.raises(HandshakeError, match=f"backend mismatch: prefill={other}"):
            client.connect(pair.endpoint.address)
    finally:
        client.close()


def test_checksum_mismatch_fails_the_transfer(make_pair, monkeypatch):
    """(shm checks none by default: the plane option turns a checksum on, and it holds.)"""
    import kv_transfer.intake as endpoint_module

    real = endpoint_module._expected_checksum
    monkeypatch.setattr(
        endpoint_module, "_expected_checksum", lambda plane, desc: real(plane, desc) ^ 1
    )
    pair = make_pair(config=replace(FAST, plane={**FAST.plane, "checksum": "xxh3"}))
    dst = pair.pool.allocate(3)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [5, 6, 7])
    wait_until(lambda: both_done(rx, tx))
    assert (rx.poll(), tx.poll()) == (S.FAILED, S.FAILED)
    assert "checksum mismatch on layer 0" in rx.error and "checksum mismatch" in tx.error
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=1)


@pytest.mark.parametrize("kind", ["xxh3", "crc32c"])
def test_a_chosen_checksum_moves_pages_bit_exact(make_pair, kind):
    """The receiver's ``checksum`` plane option reaches the sender at pairing: both sides
    check the same function, on every data path."""
    pair = make_pair(config=replace(FAST, plane={**FAST.plane, "checksum": kind}))
    dst = pair.pool.allocate(4)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [9, 2, 3, 4])
    wait_until(lambda: both_done(rx, tx))
    assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
    assert_copied(pair, [9, 2, 3, 4], dst)
    (link,) = pair.client._links.values()
    fixed = {"tcp": "xxh3", "ucx": "xxh3"}  # bytes cross a wire: the option does not apply
    assert link.plane.capabilities.checksum == fixed.get(pair.backend, kind)
    pair.pool.free(dst)


def test_finish_with_a_missing_layer_fails_both_sides(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(2)
    rx = pair.endpoint.expect(dst, lease_s=10)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [0, 1], layers=[0, 1, 3])
    tx.finish()
    assert tx.poll() is S.FAILED and "1 of 4 layers never sent (first missing: 2)" in tx.error
    wait_until(lambda: rx.poll() is S.FAILED)
    assert "aborted by sender: finish()" in rx.error
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=1)


def test_endpoint_on_another_loopback_address(backend):
    """Workers on one host often get 127.0.0.x addresses of their own (Ray nodes)."""
    from engine.kv_cache.spec import KVLayoutSpec as Spec
    from kv_transfer import make_endpoint

    from .conftest import BlockPool, allocate_dst, backend_name, random_caches, tiny_layout

    config = FAST.__class__(**{**FAST.__dict__, "host": "127.0.0.2"})
    layout = tiny_layout()
    spec = Spec.from_layout(layout, "test-model")
    pool, src = BlockPool(layout.num_blocks), random_caches(layout, 3)
    kv_pool, dst = allocate_dst(backend, layout)
    name = backend_name(backend)
    endpoint = make_endpoint(name, layout, dst, spec, pool.free, config=config)
    client = make_client(name, spec, config=config)
    try:
        ids = pool.allocate(3)
        rx = endpoint.expect(ids, lease_s=10)
        assert rx.ticket.endpoint.startswith("127.0.0.2:")
        tx = client.open(rx.ticket)
        for layer in range(layout.num_layers):
            tx.send_layer(layer, *src[layer], src_block_ids=[1, 2, 3])
        wait_until(lambda: both_done(rx, tx))
        assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
        pool.free(ids)
    finally:
        client.close()
        endpoint.close()
        if kv_pool is not None:
            kv_pool.close()
    assert pool.num_free == pool.total
