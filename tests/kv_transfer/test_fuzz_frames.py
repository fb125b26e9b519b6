"""Property-based fuzz of the KV control link's frame parser: arbitrary bytes never
raise anything but ``FrameError`` from ``wire``, never anything but ``PeerLost`` from
``ControlLink.recv_frame``, and never make the reader allocate more than its frame cap;
a real endpoint closes the socket that sent them (and only that one) and keeps pairing
honest senders. Strategies: tests/kv_transfer/fuzz_frames.py."""

from __future__ import annotations

import logging
import socket
import struct
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from kv_transfer import wire
from kv_transfer.link import ControlLink, PeerLost
from proto import kv_transfer_pb2 as pb
from tests.fuzzing import budget

from . import hostile
from .conftest import wait_until
from .fuzz_frames import STREAMS, frames
from .hostile import CLOSE_BOUND_S, closed_by_peer, connect, round_trip

served = hostile.served  # the fixture: an in-process tcp endpoint, 1 s handshake deadline


@budget(300)
@given(st.binary(min_size=4, max_size=4), st.integers(0, 1 << 20))
def test_fuzz_frame_length_is_bounded_or_a_frame_error(prefix, limit):
    (claimed,) = struct.unpack("<I", prefix)
    try:
        assert wire.frame_length(prefix, limit) == claimed <= limit
    except wire.FrameError as exc:
        assert claimed > limit and str(limit) in str(exc)


@budget(300)
@given(st.one_of(st.binary(max_size=200), frames().map(lambda f: f.SerializeToString())))
def test_fuzz_decode_frame_parses_or_raises_frame_error(body):
    try:
        frame = wire.decode_frame(body)
    except wire.FrameError:
        return
    assert isinstance(frame, pb.Frame)


@budget(150)
@given(frames())
def test_fuzz_frames_round_trip(frame):
    body = wire.encode_frame(frame)
    assert wire.frame_length(body[:4], 1 << 30) == len(body) - 4
    assert wire.decode_frame(body[4:]) == frame


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (ControlLink sets TCP_NODELAY)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    return ours, theirs


def _read_all(data: bytes, cap: int) -> tuple[list[pb.Frame], int]:
    """Feed ``data`` to a ControlLink and read frames until it gives up; returns them and
    the peak bytes the reads allocated."""
    ours, theirs = _tcp_pair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)  # then EOF: the reader never waits
    link = ControlLink(ours, "fuzz", heartbeat_s=5.0, peer_timeout_s=5.0)
    link.max_frame_bytes = cap
    got = []
    tracemalloc.start()
    try:
        while True:
            got.append(link.recv_frame(deadline=None))
    except PeerLost:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        link.close()
        theirs.close()
    return got, peak


@budget(150)
@given(STREAMS, st.sampled_from([64, 4096, wire.HANDSHAKE_MAX_FRAME_BYTES]))
def test_fuzz_control_link_reads_any_bytes_within_its_cap(data, cap):
    got, peak = _read_all(data, cap)
    assert all(isinstance(f, pb.Frame) for f in got)
    # One frame body at most, plus the parsed message and interpreter overhead.
    assert peak < 2 * cap + (256 << 10), f"{peak} bytes allocated under a {cap}-byte cap"


def test_fuzz_endpoint_closes_hostile_sockets_and_keeps_pairing(served, caplog):
    endpoint, client, pool, layout = served
    caplog.set_level(logging.WARNING, logger="kv_transfer")
    before = endpoint.stats()["refused_pairings"]
    sent = []

    @budget(80)
    @given(STREAMS)
    def hostile_peer(data):
        sock = connect(endpoint.address)
        try:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the endpoint already closed it (e.g. on an oversized prefix)
            wait_until(lambda: closed_by_peer(sock), CLOSE_BOUND_S)
        finally:
            sock.close()
        sent.append(data)

    client.connect(endpoint.address)  # paired before the flood: it must not notice
    hostile_peer()
    round_trip(endpoint, client, pool, layout)
    assert hostile.pairs_at(client.spec, endpoint.address)
    crashed = [r.getMessage() for r in caplog.records if "crash" in r.getMessage()]
    assert not crashed, crashed
    assert endpoint.stats()["refused_pairings"] > before
    assert len(sent) >= 1
