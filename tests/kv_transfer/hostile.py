"""Helpers for the hostile-peer tests: raw sockets that misbehave before pairing, and a
small in-process endpoint to point them at."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import selectors
import socket
import time

import pytest

from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import HandshakeError, TransferState, make_client, make_endpoint

from .conftest import FAST, BlockPool, random_caches, tiny_layout, wait_until

CTX = mp.get_context("spawn")
CLOSE_BOUND_S = 6.0
"""Seconds within which every flood socket must have been closed: the 1 s handshake
deadline plus slack for a busy 2-core machine."""


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def connect(address: str, source: str | None = None) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.socket()
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host, int(port)))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the endpoint closed ``sock`` (EOF or reset); never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def wait_closed(socks: list[socket.socket], bound_s: float, trickle_s: float = 0.0) -> None:
    """Wait until the endpoint closed every socket, sending one byte per ``trickle_s`` on
    each still-open one meanwhile (a peer that is slow, not silent)."""
    left = open_after(socks, bound_s, trickle_s)
    assert not left, f"{left} of {len(socks)} sockets still open after {bound_s}s"


def open_after(socks: list[socket.socket], bound_s: float, trickle_s: float = 0.0) -> int:
    """How many of ``socks`` the endpoint has not closed within ``bound_s``."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    open_socks, deadline, next_byte = set(socks), time.monotonic() + bound_s, 0.0
    while open_socks and time.monotonic() < deadline:
        if trickle_s and time.monotonic() >= next_byte:
            next_byte = time.monotonic() + trickle_s
            for sock in list(open_socks):
                try:
                    sock.send(b"\x00")
                except OSError:
                    pass  # closed by the endpoint: the read below sees it
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj in open_socks and closed_by_peer(key.fileobj):
                open_socks.discard(key.fileobj)
                sel.unregister(key.fileobj)
    sel.close()
    return len(open_socks)


def send_layers(tx, layout, src, ids) -> None:
    for layer in range(layout.num_layers):
        tx.send_layer(layer, *src[layer], src_block_ids=ids)


@pytest.fixture
def served(request):
    """An in-process tcp endpoint with small pending limits and a 1 s handshake deadline
    (other settings: ``@pytest.mark.parametrize("served", [{...}], indirect=True)``),
    plus a good client; checks that every block is back at the end."""
    layout = tiny_layout()
    spec = KVLayoutSpec.from_layout(layout, "test-model")
    pool = BlockPool(layout.num_blocks)
    settings = {"handshake_timeout_s": 1.0, **getattr(request, "param", {})}
    config = dataclasses.replace(FAST, max_pending_pairings=8, max_pending_per_host=4, **settings)
    endpoint = make_endpoint("tcp", layout, layout.allocate(), spec, pool.free, config=config)
    client = make_client("tcp", spec, config=FAST)
    yield endpoint, client, pool, layout
    client.close()
    endpoint.close()
    assert pool.num_free == pool.total


def round_trip(endpoint, client, pool, layout) -> None:
    ids = pool.allocate(3)
    rx = endpoint.expect(ids, lease_s=30)
    tx = client.open(rx.ticket)
    send_layers(tx, layout, random_caches(layout, 2), [4, 5, 6])
    wait_until(lambda: rx.poll().terminal and tx.poll().terminal, timeout=10)
    assert (rx.poll(), tx.poll()) == (TransferState.SUCCESS,) * 2, (rx.error, tx.error)
    pool.free(ids)


def pairs_at(spec, address: str) -> bool:
    """Whether a fresh sender pairs with ``address`` now."""
    client = make_client("tcp", spec, config=FAST)
    try:
        client.connect(address)
        return True
    except (OSError, HandshakeError):
        return False
    finally:
        client.close()
