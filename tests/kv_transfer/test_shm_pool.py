"""shm into a shared KV pool: the sender writes the destination blocks in place, and the
fence (kv_transfer/backends/shm_fence.py) keeps a writer that dies, stops or runs late
from touching blocks that are no longer its transfer's."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket

import pytest

from kv_transfer import TransferState
from proto import kv_transfer_pb2 as pb

from . import peers
from .conftest import DEATH, PEER_DEATH_BOUND_S, wait_until
from .test_conformance import assert_copied, both_done, send_layers

S = TransferState
CTX = mp.get_context("spawn")
pytestmark = pytest.mark.parametrize("backend", ["shm"])


def _kill(proc) -> None:
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def _regions() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pdserve-kv-")}


def _complete(pair, dst, src_ids) -> None:
    """A transfer into ``dst`` from this process's client, checked bit for bit."""
    rx = pair.endpoint.expect(dst, lease_s=30)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, src_ids)
    wait_until(lambda: both_done(rx, tx))
    assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
    assert_copied(pair, src_ids, dst)


def test_layers_are_written_in_place_through_no_region(make_pair):
    pair = make_pair()
    before = _regions()
    dst = pair.pool.allocate(5)
    _complete(pair, dst, [3, 9, 10, 11, 40])
    (link,) = pair.client._links.values()
    assert link.plane.capabilities.writes_in_place
    assert _regions() == before, "an in-place transfer made a shared region"
    pair.pool.free(dst)


def test_killed_writer_frees_its_blocks_and_leaves_the_others_intact(make_pair):
    pair = make_pair(config=DEATH)
    theirs, ours = pair.pool.allocate(4), pair.pool.allocate(4)
    rx = pair.endpoint.expect(theirs, lease_s=60)
    sent = CTX.Event()
    proc = CTX.Process(target=peers.run_sender, args=(pair.backend, rx.ticket, sent, 2))
    proc.start()
    try:
        rx_ours = pair.endpoint.expect(ours, lease_s=60)  # another request, in flight too
        tx_ours = pair.client.open(rx_ours.ticket)
        send_layers(pair, tx_ours, [20, 21, 22, 23], layers=[0, 1])
        assert sent.wait(60), "sender process did not start"
        wait_until(lambda: rx.layers_arrived() == [0, 1], timeout=10)
        _kill(proc)
        wait_until(lambda: rx.poll() is S.FAILED, timeout=PEER_DEATH_BOUND_S + 2)
        wait_until(lambda: pair.pool.num_free == pair.pool.total - 4, timeout=5)
        send_layers(pair, tx_ours, [20, 21, 22, 23], layers=[2, 3])
        wait_until(lambda: both_done(rx_ours, tx_ours))
        assert rx_ours.poll() is S.SUCCESS, rx_ours.error
        assert_copied(pair, [20, 21, 22, 23], ours)
        pair.pool.free(ours)
        again = pair.pool.allocate(4)  # the dead writer's blocks serve the next request
        _complete(pair, again, [30, 31, 32, 33])
        pair.pool.free(again)
    finally:
        _kill(proc)


def test_stopped_writer_keeps_its_blocks_and_never_writes_them_once_reclaimed(make_pair):
    """A writer frozen mid-transfer outlives its transfer (the receiver's peer timeout
    fails it), then resumes with more layers queued. The receiver must not hand its
    blocks to anyone while it may still write, and once it let go, nothing it still
    had queued lands in them."""
    pair = make_pair(config=DEATH)
    dst = pair.pool.allocate(4)
    rx = pair.endpoint.expect(dst, lease_s=60)
    sent, go, done = CTX.Event(), CTX.Event(), CTX.Event()
    args = (pair.backend, rx.ticket, sent, go, done, 99)
    proc = CTX.Process(target=peers.run_pausing_sender, args=args)
    proc.start()
    try:
        assert sent.wait(60), "sender process did not start"
        wait_until(lambda: rx.layers_arrived() == [0, 1], timeout=10)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: rx.poll() is S.FAILED, timeout=PEER_DEATH_BOUND_S + 2)
        assert "sender lost" in rx.error
        assert pair.pool.num_free == pair.pool.total - 4, "blocks freed under a live writer"
        os.kill(proc.pid, signal.SIGCONT)  # (before go: a stopped waiter blocks the set)
        go.set()  # it sends layers 2 and 3 and hears its transfer failed
        assert done.wait(PEER_DEATH_BOUND_S + 10), "the resumed writer never saw its end"
        wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=10)
        pair.pool.take(dst)  # the same blocks go to the next request, and stay its own
        _complete(pair, dst, [5, 6, 7, 8])
        pair.pool.free(dst)
    finally:
        _kill(proc)


def test_the_pool_goes_only_to_a_paired_sender_once(make_pair):
    pair = make_pair()
    rx = pair.endpoint.expect(pair.pool.allocate(1), lease_s=30)
    pair.client.open(rx.ticket)
    grants = pair.endpoint._host._grants
    (link,) = pair.client._links.values()
    for token in ("0" * 32, "f" * 32):  # guessed tokens get nothing
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect("\0" + grants.name)
            s.sendall(token.encode())
            msg, fds, _, _ = socket.recv_fds(s, 16, 1)
        assert (msg, fds) == (b"", [])
    assert link.plane.capabilities.writes_in_place  # the paired sender redeemed its own
    rx.abort("done")
    wait_until(lambda: pair.pool.num_free == pair.pool.total)


def test_a_sender_that_cannot_map_the_pool_sends_through_regions(make_pair, monkeypatch):
    import kv_transfer.backends.shm as shm

    def refuse(params, timeout_s):
        raise OSError("another host")

    monkeypatch.setattr(shm, "fetch_pool", refuse)
    pair = make_pair()
    dst = pair.pool.allocate(3)
    _complete(pair, dst, [1, 2, 3])
    (link,) = pair.client._links.values()
    assert not link.plane.capabilities.writes_in_place
    # ... and a descriptor claiming in-place pages on that link fails its transfer only
    bad = pair.endpoint.expect(pair.pool.allocate(2), lease_s=30)
    tx = pair.client.open(bad.ticket)
    wait_until(lambda: tx.poll() is S.WAITING)
    n, bb = 2, pair.layout.block_bytes
    desc = pb.PageDescriptor(
        transfer_id=bad.ticket.transfer_id, epoch=bad.ticket.epoch, layer=0,
        block_ids=bad.ticket.block_ids, k_bytes=n * bb, v_bytes=n * bb, written_in_place=True,
    )  # fmt: skip
    link.link.send(pb.Frame(pages=desc))
    wait_until(lambda: bad.poll() is S.FAILED and tx.poll() is S.FAILED)
    assert "not handed the pool" in bad.error
    pair.pool.free(dst)
