"""A peer process that dies (SIGKILL) or freezes (SIGSTOP) mid-transfer turns the
transfer FAILED on the other side within a bound, and frees the receiver's blocks."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from kv_transfer import TransferState

from . import peers
from .conftest import DEATH, PEER_DEATH_BOUND_S, wait_until

CTX = mp.get_context("spawn")


def _stop(proc, how: str) -> float:
    os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    return time.monotonic()


def _reap(proc) -> None:
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_sender_dies(make_pair, how):
    pair = make_pair(config=DEATH)
    dst = pair.pool.allocate(4)
    rx = pair.endpoint.expect(dst, lease_s=60)
    sent = CTX.Event()
    proc = CTX.Process(target=peers.run_sender, args=(pair.backend, rx.ticket, sent, 2))
    proc.start()
    try:
        assert sent.wait(60), "sender process did not start"
        wait_until(lambda: rx.layers_arrived() == [0, 1], timeout=10)
        killed_at = _stop(proc, how)
        wait_until(lambda: rx.poll() is TransferState.FAILED, timeout=PEER_DEATH_BOUND_S + 2)
        assert time.monotonic() - killed_at <= PEER_DEATH_BOUND_S, rx.error
        assert "sender lost" in rx.error
        if pair.variant == "shm" and how == "stop":
            # It wrote in place and may resume: its blocks stay reserved while it holds
            # them (shm_fence.py); they come back the moment it dies.
            assert pair.pool.num_free == pair.pool.total - 4
            _reap(proc)
        wait_until(lambda: pair.pool.num_free == pair.pool.total, timeout=5)
    finally:
        _reap(proc)


def test_receiver_dies(make_pair):
    pair = make_pair(config=DEATH)
    tickets = CTX.Queue()
    proc = CTX.Process(target=peers.run_receiver, args=(pair.backend, tickets))
    proc.start()
    try:
        ticket = tickets.get(timeout=60)
        tx = pair.client.open(ticket)
        wait_until(lambda: tx.poll() is TransferState.WAITING, timeout=10)
        tx.send_layer(0, *pair.src[0], src_block_ids=[0, 1, 2, 3])
        killed_at = _stop(proc, "kill")
        wait_until(lambda: tx.poll() is TransferState.FAILED, timeout=PEER_DEATH_BOUND_S + 2)
        assert time.monotonic() - killed_at <= PEER_DEATH_BOUND_S, tx.error
        assert "receiver lost" in tx.error or "send failed" in tx.error, tx.error
    finally:
        _reap(proc)
