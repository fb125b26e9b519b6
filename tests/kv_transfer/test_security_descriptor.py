"""A bad descriptor on a shared link fails its own transfer only, on every backend: the
link stays up and another transfer on it succeeds, bit for bit (conformance fixtures)."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import TransferState
from proto import kv_transfer_pb2 as pb

from .conftest import wait_until
from .test_conformance import assert_copied, both_done, send_layers

S = TransferState


def _two_transfers(pair, n: int = 3):
    """Two transfers opened on the same link (the client pairs once per endpoint)."""
    jobs = []
    for _ in range(2):
        dst = pair.pool.allocate(n)
        rx = pair.endpoint.expect(dst, lease_s=30)
        jobs.append((rx, pair.client.open(rx.ticket), dst))
    for rx, tx, _ in jobs:
        wait_until(lambda rx=rx, tx=tx: rx.poll() is S.WAITING and tx.poll() is S.WAITING)
    return jobs, pair.client._links[pair.endpoint.address]


def _send_raw(link, rx, half: int) -> None:
    """Send one layer of ``rx``'s transfer whose descriptor announces ``half`` bytes for
    K and for V, with exactly the payload that announcement frames: what a buggy or
    hostile sender on the same link would put on the wire. The link's writer thread is
    idle (nothing queued), so using its plane from here does not race."""
    ticket = rx.ticket
    staging = link.plane.staging(2 * half)
    staging.copy_(torch.randint(0, 256, (2 * half,), dtype=torch.uint8))
    desc = pb.PageDescriptor(
        transfer_id=ticket.transfer_id,
        epoch=ticket.epoch,
        layer=0,
        block_ids=ticket.block_ids,
        k_bytes=half,
        v_bytes=half,
        checksum=0,
        chunk_bytes=link._chunk_bytes,
    )
    link.plane.send(desc, staging)


def test_security_byte_count_mismatch_fails_only_its_transfer(make_pair):
    """One transfer's descriptor announces 8 bytes too many per block: that transfer fails
    (both sides hear why), the payload is skipped, and the other transfer on the same link
    succeeds. A payload no layer of this cache could have is not skipped: that link
    closes, and the endpoint pairs the next sender as usual."""
    pair = make_pair()
    (bad, good), link = _two_transfers(pair)
    n, bb = len(bad[0].ticket.block_ids), pair.layout.block_bytes
    _send_raw(link, bad[0], n * (bb + 8))
    wait_until(lambda: bad[0].poll() is S.FAILED and bad[1].poll() is S.FAILED)
    src = [9, 2, 30]
    send_layers(pair, good[1], src)
    good[1].finish()
    wait_until(lambda: both_done(good[0], good[1]))
    assert (good[0].poll(), good[1].poll()) == (S.SUCCESS, S.SUCCESS), good[0].error
    assert_copied(pair, src, good[2])
    assert pair.client._links[pair.endpoint.address] is link and not link.link.closed
    assert f"announces {n * (bb + 8)}+{n * (bb + 8)} bytes for {n} blocks" in bad[0].error
    assert "announces" in bad[1].error
    assert pair.endpoint.stats()["dropped_pages"] == 2 * n
    pair.pool.free(good[2])

    third = pair.endpoint.expect(pair.pool.allocate(2), lease_s=30)
    huge = pb.PageDescriptor(
        transfer_id=third.ticket.transfer_id,
        epoch=third.ticket.epoch,
        block_ids=third.ticket.block_ids,
        k_bytes=1 << 40,
        v_bytes=1 << 40,
    )
    pair.client.open(third.ticket)
    link.link.send(pb.Frame(pages=huge))
    wait_until(lambda: link.link.closed and third.poll() is S.FAILED)
    dst = pair.pool.allocate(2)
    rx = pair.endpoint.expect(dst, lease_s=30)
    tx = pair.client.open(rx.ticket)  # pairs a new link
    send_layers(pair, tx, [1, 2])
    wait_until(lambda: both_done(rx, tx))
    assert rx.poll() is S.SUCCESS, rx.error
    pair.pool.free(dst)
    wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=2)


@pytest.mark.parametrize("backend", ["shm"])
def test_security_unreadable_shm_region_fails_only_its_transfer(make_pair):
    """shm: a descriptor naming a region that does not exist (or overruns one) fails that
    transfer; the region is released and the link stays up for the next transfer."""
    pair = make_pair()
    (bad, good), link = _two_transfers(pair)
    n, bb = len(bad[0].ticket.block_ids), pair.layout.block_bytes
    desc = pb.PageDescriptor(
        transfer_id=bad[0].ticket.transfer_id,
        epoch=bad[0].ticket.epoch,
        block_ids=bad[0].ticket.block_ids,
        k_bytes=n * bb,
        v_bytes=n * bb,
        shm=pb.ShmRegion(name="pdserve-kv-does-not-exist", size=1 << 20),
    )
    link.link.send(pb.Frame(pages=desc))
    wait_until(lambda: bad[0].poll() is S.FAILED)
    assert "pdserve-kv-does-not-exist" in bad[0].error
    send_layers(pair, good[1], [4, 5, 6])
    wait_until(lambda: both_done(good[0], good[1]))
    assert good[0].poll() is S.SUCCESS, good[0].error
    assert not link.link.closed
    pair.pool.free(good[2])
