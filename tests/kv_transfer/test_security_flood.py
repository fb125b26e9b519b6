"""A hostile peer before pairing: length-prefix floods, trickled bytes and malformed
Hellos cost the endpoint bounded memory, close only their own sockets by the handshake
deadline, and never stop it serving a good peer."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from kv_transfer import make_client
from proto import kv_transfer_pb2 as pb

from . import hostile, peers
from .conftest import FAST, random_caches, wait_until
from .hostile import (
    CLOSE_BOUND_S,
    CTX,
    connect,
    open_after,
    round_trip,
    send_layers,
    status_kib,
    wait_closed,
)

served = hostile.served  # the fixture

FLOOD_SOCKETS = 12


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
        peak_before = status_kib(proc.pid, "VmHWM")
        for i in range(FLOOD_SOCKETS):
            sock = connect(address)
            sock.sendall(struct.pack("<I", 64 << 20 if i % 2 else 1000))
            socks.append(sock)
        left = open_after(socks, CLOSE_BOUND_S, trickle_s=0.2)
        grown_mib = (status_kib(proc.pid, "VmHWM") - peak_before) / 1024
        assert grown_mib < 48, f"endpoint peak RSS grew by {grown_mib:.0f} MiB under the flood"
        assert not left, f"{left} of {FLOOD_SOCKETS} flood sockets still open"
        layout, spec = peers._spec()
        src = random_caches(layout, 1)
        client = make_client("tcp", spec, config=FAST)
        try:
            tx = client.open(ticket)
            send_layers(tx, layout, src, [0, 1, 2, 3])
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


@pytest.mark.parametrize(
    "body",
    [b"\xff" * 12, b"\x0a\x03\x0a\x01", b"\x0a\x04\x12\x02\xff\xfe"],
    ids=["garbage", "hello-cut-inside-its-spec", "backend-not-utf8"],
)
def test_security_malformed_hello_closes_only_its_socket(served, body):
    endpoint, client, pool, layout = served
    client.connect(endpoint.address)  # a link paired before the bad peer shows up
    bad = connect(endpoint.address)
    try:
        bad.sendall(struct.pack("<I", len(body)) + body)
        wait_closed([bad], CLOSE_BOUND_S)
    finally:
        bad.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 1)
    round_trip(endpoint, client, pool, layout)  # the old link still works
    fresh = make_client("tcp", client.spec, config=FAST)
    try:
        round_trip(endpoint, fresh, pool, layout)  # and new peers still pair
    finally:
        fresh.close()


def test_security_wrong_first_frame_is_refused(served):
    endpoint, client, pool, layout = served
    bad = connect(endpoint.address)
    try:
        body = pb.Frame(open=pb.Open(transfer_id="x", epoch=endpoint.epoch)).SerializeToString()
        bad.sendall(struct.pack("<I", len(body)) + body)
        wait_closed([bad], CLOSE_BOUND_S)
    finally:
        bad.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 1)
    round_trip(endpoint, client, pool, layout)


def test_security_trickling_peer_is_cut_at_the_deadline(served):
    """One byte every 0.2 s keeps the old endpoint's socket (and thread) forever: every
    byte resets its silence timer. The handshake deadline closes it regardless."""
    endpoint, client, pool, layout = served
    socks = [connect(endpoint.address) for _ in range(3)]
    socks[0].sendall(struct.pack("<I", 1000))  # a whole prefix, then the body trickles
    socks[1].sendall(b"\x10")  # the prefix itself trickles (a 16-byte frame)
    try:
        started = time.monotonic()
        wait_closed(socks, CLOSE_BOUND_S, trickle_s=0.2)
        assert time.monotonic() - started >= 0.9, "closed before the deadline: not by it"
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: endpoint.stats()["refused_pairings"] == 3)
    round_trip(endpoint, client, pool, layout)
