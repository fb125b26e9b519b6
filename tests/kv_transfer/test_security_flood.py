"""A hostile peer before pairing: length-prefix floods, trickled bytes, socket floods and
malformed Hellos cost the endpoint bounded memory and threads, close only their own
sockets, and never stop it serving a good peer."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import selectors
import socket
import struct
import threading
import time

import pytest

from kv_transfer import HandshakeError, TransferState, make_client, make_endpoint, wire
from kv_transfer.link import ControlLink
from proto import kv_transfer_pb2 as pb

from . import peers
from .conftest import FAST, BlockPool, random_caches, tiny_layout, wait_until

CTX = mp.get_context("spawn")
FLOOD_SOCKETS = 12
CLOSE_BOUND_S = 6.0
"""Seconds within which every flood socket must have been closed: the 1 s handshake
deadline plus slack for a busy 2-core machine."""


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def _connect(address: str, source: str | None = None) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.socket()
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host, int(port)))
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the endpoint closed ``sock`` (EOF or reset); never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _wait_closed(socks: list[socket.socket], bound_s: float, trickle_s: float = 0.0) -> None:
    """Wait until the endpoint closed every socket, sending one byte per ``trickle_s`` on
    each still-open one meanwhile (a peer that is slow, not silent)."""
    left = _open_after(socks, bound_s, trickle_s)
    assert not left, f"{left} of {len(socks)} sockets still open after {bound_s}s"


def _open_after(socks: list[socket.socket], bound_s: float, trickle_s: float = 0.0) -> int:
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
            if key.fileobj in open_socks and _closed_by_peer(key.fileobj):
                open_socks.discard(key.fileobj)
                sel.unregister(key.fileobj)
    sel.close()
    return len(open_socks)


def _send_layers(tx, layout, src, ids) -> None:
    for layer in range(layout.num_layers):
        tx.send_layer(layer, *src[layer], src_block_ids=ids)


def test_security_length_prefix_flood_allocates_nothing_and_is_closed():
    """The issue's reproduction: sockets that send only a length prefix (64 MiB, the old
    limit) or a small one and then 1 byte at a time. Measured in the endpoint's own
    process: its peak RSS must not grow by what they claim (12 x 64 MiB on the old code)."""
    out, done = CTX.Queue(), CTX.Event()
    proc = CTX.Process(target=peers.run_endpoint, args=("tcp", 1.0, out, done))
    proc.start()
    socks: list[socket.socket] = []
    try:
        address, ticket = out.get(timeout=60)
        peak_before = _status_kib(proc.pid, "VmHWM")
        for i in range(FLOOD_SOCKETS):
            sock = _connect(address)
            sock.sendall(struct.pack("<I", 64 << 20 if i % 2 else 1000))
            socks.append(sock)
        left = _open_after(socks, CLOSE_BOUND_S, trickle_s=0.2)
        grown_mib = (_status_kib(proc.pid, "VmHWM") - peak_before) / 1024
        assert grown_mib < 48, f"endpoint peak RSS grew by {grown_mib:.0f} MiB under the flood"
        assert not left, f"{left} of {FLOOD_SOCKETS} flood sockets still open"
        layout, spec = peers._spec()
        src = random_caches(layout, 1)
        client = make_client("tcp", spec, config=FAST)
        try:
            tx = client.open(ticket)
            _send_layers(tx, layout, src, [0, 1, 2, 3])
            state, error, stats = out.get(timeout=30)
        finally:
            client.close()
        assert state == "success", error
        assert stats["refused_pairings"] == FLOOD_SOCKETS, stats
    finally:
        done.set()
        for sock in socks:
            sock.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


@pytest.fixture
def served(request):
    """An in-process tcp endpoint with small pending limits and a 1 s handshake deadline
    (other settings: ``@pytest.mark.parametrize("served", [{...}], indirect=True)``),
    plus a good client; checks that every block is back at the end."""
    from engine.kv_cache.layout import KVLayoutSpec

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


def _round_trip(endpoint, client, pool, layout) -> None:
    ids = pool.allocate(3)
    rx = endpoint.expect(ids, lease_s=30)
    tx = client.open(rx.ticket)
    _send_layers(tx, layout, random_caches(layout, 2), [4, 5, 6])
    wait_until(lambda: rx.poll().terminal and tx.poll().terminal, timeout=10)
    assert (rx.poll(), tx.poll()) == (TransferState.SUCCESS,) * 2, (rx.error, tx.error)
    pool.free(ids)


@pytest.mark.parametrize(
    "body",
    [b"\xff" * 12, b"\x0a\x03\x0a\x01", b"\x0a\x04\x12\x02\xff\xfe"],
    ids=["garbage", "hello-cut-inside-its-spec", "backend-not-utf8"],
)
def test_security_malformed_hello_closes_only_its_socket(served, body):
    endpoint, client, pool, layout = served
    client.connect(endpoint.address)  # a link paired before the bad peer shows up
    bad = _connect(endpoint.address)
    try:
        bad.sendall(struct.pack("<I", len(body)) + body)
        _wait_closed([bad], CLOSE_BOUND_S)
    finally:
        bad.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 1)
    _round_trip(endpoint, client, pool, layout)  # the old link still works
    fresh = make_client("tcp", client.spec, config=FAST)
    try:
        _round_trip(endpoint, fresh, pool, layout)  # and new peers still pair
    finally:
        fresh.close()


def test_security_wrong_first_frame_is_refused(served):
    endpoint, client, pool, layout = served
    bad = _connect(endpoint.address)
    try:
        body = pb.Frame(open=pb.Open(transfer_id="x", epoch=endpoint.epoch)).SerializeToString()
        bad.sendall(struct.pack("<I", len(body)) + body)
        _wait_closed([bad], CLOSE_BOUND_S)
    finally:
        bad.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 1)
    _round_trip(endpoint, client, pool, layout)


def _hello_from(address: str, source: str, spec) -> pb.HelloReply:
    """A sender's Hello from the address ``source``; the endpoint's reply."""
    link = ControlLink(_connect(address, source), "probe", FAST.heartbeat_s, FAST.peer_timeout_s)
    try:
        hello = pb.Hello(spec=wire.spec_to_pb(spec), backend="tcp", sender_id="probe")
        link.send(pb.Frame(hello=hello))
        return link.recv_frame().hello_reply
    finally:
        link.close()


def _pairs(endpoint, spec) -> bool:
    client = make_client("tcp", spec, config=FAST)
    try:
        client.connect(endpoint.address)
        return True
    except (OSError, HandshakeError):
        return False
    finally:
        client.close()


# Neither the deadline nor the silence timeout can close a socket within this test.
@pytest.mark.parametrize(
    "served", [{"handshake_timeout_s": 60.0, "peer_timeout_s": 60.0}], indirect=True
)
def test_security_pending_sockets_are_bounded(served):
    """Idle sockets beyond the per-host limit are closed at once (no thread, no buffer);
    another host still gets a slot; paired links keep working meanwhile; and once the
    flood is gone a new sender pairs."""
    endpoint, client, pool, layout = served
    client.connect(endpoint.address)
    threads_before = threading.active_count()
    held = [_connect(endpoint.address) for _ in range(4)]  # accepted in connection order
    extra = [_connect(endpoint.address) for _ in range(20)]
    try:
        _wait_closed(extra, CLOSE_BOUND_S)
        assert endpoint.stats()["refused_connections"] == 20
        assert not any(_closed_by_peer(s) for s in held), "an admitted socket was closed early"
        assert threading.active_count() <= threads_before + 4
        assert _hello_from(endpoint.address, "127.0.0.2", client.spec).ok  # another host
        _round_trip(endpoint, client, pool, layout)  # the paired link is unaffected
    finally:
        for sock in held + extra:
            sock.close()
    wait_until(lambda: _pairs(endpoint, client.spec), timeout=CLOSE_BOUND_S)
    _round_trip(endpoint, client, pool, layout)


def test_security_trickling_peer_is_cut_at_the_deadline(served):
    """One byte every 0.2 s keeps the old endpoint's socket (and thread) forever: every
    byte resets its silence timer. The handshake deadline closes it regardless."""
    endpoint, client, pool, layout = served
    socks = [_connect(endpoint.address) for _ in range(3)]
    socks[0].sendall(struct.pack("<I", 1000))  # a whole prefix, then the body trickles
    socks[1].sendall(b"\x10")  # the prefix itself trickles (a 16-byte frame)
    try:
        started = time.monotonic()
        _wait_closed(socks, CLOSE_BOUND_S, trickle_s=0.2)
        assert time.monotonic() - started >= 0.9, "closed before the deadline: not by it"
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 3)
    _round_trip(endpoint, client, pool, layout)


def test_security_silent_ucx_connection_is_closed():
    """The ucx listener is reachable by anyone: a connection that never sends its token
    is closed at the handshake deadline instead of holding a handler forever."""
    from engine.kv_cache.layout import KVLayoutSpec
    from kv_transfer.backends.ucx import UcxLoop

    layout = tiny_layout()
    spec = KVLayoutSpec.from_layout(layout, "test-model")
    pool = BlockPool(layout.num_blocks)
    config = dataclasses.replace(FAST, handshake_timeout_s=1.0)
    endpoint = make_endpoint("ucx", layout, layout.allocate(), spec, pool.free, config=config)
    ucx, host = UcxLoop.get(config), endpoint._host
    try:

        async def dial():
            return await ucx.ucxx.create_endpoint("127.0.0.1", host._listener.port)

        silent = ucx.run(dial(), timeout=10)
        wait_until(lambda: len(host._handlers) == 1, timeout=10)
        wait_until(lambda: not host._handlers, timeout=CLOSE_BOUND_S)
        ucx.run(silent.close(), timeout=10)
        client = make_client("ucx", spec, config=FAST)
        try:
            _round_trip(endpoint, client, pool, layout)  # the listener still pairs senders
        finally:
            client.close()
    finally:
        endpoint.close()
    assert pool.num_free == pool.total


def test_security_running_out_of_file_descriptors_does_not_stop_accepting():
    """A flood that exhausts the endpoint's file descriptors (accept fails with EMFILE)
    must not end its accept loop: once the flood is gone, a sender pairs and transfers."""
    out, done = CTX.Queue(), CTX.Event()
    proc = CTX.Process(
        target=peers.run_endpoint,
        args=("tcp", 30.0, out, done, 6),
        kwargs={"peer_timeout_s": 30.0},  # the flood's sockets stay until it closes them
    )
    proc.start()
    socks: list[socket.socket] = []
    try:
        address, ticket = out.get(timeout=60)
        socks = [_connect(address) for _ in range(12)]  # twice the descriptors it has left
        wait_until(lambda: _accept_failed(proc.pid), timeout=10)
        for sock in socks:
            sock.close()
        layout, spec = peers._spec()
        client = make_client("tcp", spec, config=FAST)
        try:
            wait_until(lambda: _pairs_at(client, address), timeout=CLOSE_BOUND_S)
            tx = client.open(ticket)
            _send_layers(tx, layout, random_caches(layout, 1), [0, 1, 2, 3])
            state, error, _ = out.get(timeout=30)
        finally:
            client.close()
        assert state == "success", error
    finally:
        done.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _accept_failed(pid: int) -> bool:
    """The endpoint process holds as many descriptors as its limit allows."""
    import os

    with open(f"/proc/{pid}/limits") as f:
        soft = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
    return len(os.listdir(f"/proc/{pid}/fd")) >= soft


def _pairs_at(client, address: str) -> bool:
    try:
        client.connect(address)
        return True
    except (OSError, HandshakeError):
        return False
