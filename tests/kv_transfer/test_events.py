"""What an owner's engine thread relies on, on every backend: each side's ``on_done`` is
called exactly once, with the terminal state, when a transfer ends; on the receiver's
FAILED only after its blocks went back through ``free_blocks`` (so the owner may reuse
them at once); and every paired plane declares its capabilities instead of being probed."""

from __future__ import annotations

import threading

from kv_transfer import TransferState
from kv_transfer.plane import Capabilities

from .conftest import wait_until
from .test_conformance import send_layers

S = TransferState


class Done:
    """Records ``on_done`` calls, and what the pool held free at each."""

    def __init__(self, pool=None) -> None:
        self.calls: list[tuple[str, TransferState, int | None]] = []
        self._pool, self._lock = pool, threading.Lock()

    def __call__(self, transfer_id: str, state: TransferState) -> None:
        with self._lock:
            free = self._pool.num_free if self._pool is not None else None
            self.calls.append((transfer_id, state, free))


def test_on_done_once_with_success_on_both_sides(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(5)
    rx_done, tx_done = Done(), Done()
    rx = pair.endpoint.expect(dst, lease_s=30, on_done=rx_done)
    tx = pair.client.open(rx.ticket, on_done=tx_done)
    send_layers(pair, tx, [7, 1, 30, 12, 4])
    tx.finish()
    wait_until(lambda: rx_done.calls and tx_done.calls)
    tid = rx.ticket.transfer_id
    assert [c[:2] for c in rx_done.calls] == [(tid, S.SUCCESS)] == [c[:2] for c in tx_done.calls]
    tx.abort("too late")  # a terminal transfer is not reported again
    assert len(rx_done.calls) == len(tx_done.calls) == 1
    pair.pool.free(dst)  # the engine owns them after SUCCESS


def test_receiver_failed_is_reported_after_its_blocks_are_free(make_pair):
    pair = make_pair()
    dst = pair.pool.allocate(4)
    rx_done, tx_done = Done(pair.pool), Done()
    rx = pair.endpoint.expect(dst, lease_s=30, on_done=rx_done)
    tx = pair.client.open(rx.ticket, on_done=tx_done)
    send_layers(pair, tx, [2, 3, 5, 8], layers=[0])  # one layer in, then the owner aborts
    rx.abort("aborted by the router")
    wait_until(lambda: rx_done.calls and tx_done.calls)
    assert rx_done.calls == [(rx.ticket.transfer_id, S.FAILED, pair.pool.total)]
    assert [c[1] for c in tx_done.calls] == [S.FAILED]


def test_lease_expiry_reports_failed_once(make_pair):
    pair = make_pair()
    done = Done(pair.pool)
    rx = pair.endpoint.expect(pair.pool.allocate(3), lease_s=0.2, on_done=done)
    wait_until(lambda: done.calls)
    assert done.calls == [(rx.ticket.transfer_id, S.FAILED, pair.pool.total)]


def test_planes_declare_their_capabilities(make_pair):
    pair = make_pair()
    rx = pair.endpoint.expect(pair.pool.allocate(2), lease_s=30)
    tx = pair.client.open(rx.ticket)
    (link,) = pair.client._links.values()
    caps = link.plane.capabilities
    assert isinstance(caps, Capabilities)
    want = {
        "tcp": Capabilities(zero_copy_send=True),
        "ucx": Capabilities(default_chunk_bytes=4 << 20, run_messages=True, run_min_bytes=512),
    }
    if pair.backend in want:
        assert caps == want[pair.backend]
    elif pair.backend == "shm":
        assert caps.same_host_only and caps.max_payload_bytes == 1024
        # in place into a shared pool (one copy per byte), else through regions; no
        # checksum within one host's memory
        assert caps.writes_in_place == (pair.variant == "shm") and caps.checksum == "none"
    else:
        assert caps.chunk_bytes == 512  # torch_dist: fixed at pairing (the config's here)
        assert caps.checksum == "xxh3"  # gloo crosses a TCP wire
        assert caps.run_messages and caps.run_min_bytes == 512
    tx.abort("done looking")
    wait_until(lambda: rx.poll().terminal)


def test_success_reports_its_timings_and_the_tail_after_the_last_layer(make_pair):
    """``timings`` (set with SUCCESS) bracket what this process saw, on its one clock: the
    first page arrived before it saw layer 0 in, the transfer ended after it queued the
    last layer, and the tail lies between queuing the last layer and seeing SUCCESS."""
    import time

    pair = make_pair()
    dst = pair.pool.allocate(3)
    rx = pair.endpoint.expect(dst, lease_s=30)
    tx = pair.client.open(rx.ticket)
    send_layers(pair, tx, [4, 5, 6], layers=[0, 1, 2])
    wait_until(lambda: rx.layers_arrived() == [0, 1, 2])
    seen_first = time.monotonic()
    assert rx.timings is None
    queued_last = time.monotonic()
    send_layers(pair, tx, [4, 5, 6], layers=[3])
    wait_until(lambda: rx.poll() is S.SUCCESS)
    seen_success = time.monotonic()
    t = rx.timings
    assert t.seconds >= queued_last - seen_first
    assert 0 <= t.tail_seconds <= seen_success - queued_last
    wait_until(lambda: tx.poll().terminal)
    pair.pool.free(dst)
