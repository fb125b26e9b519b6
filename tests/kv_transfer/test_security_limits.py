"""Limits a hostile peer runs into: pending sockets per host and in all, a silent ucx
connection, and running the endpoint out of file descriptors; none of them stops it
serving paired links or pairing new senders afterwards."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import pytest

from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import make_client, make_endpoint, wire
from kv_transfer.link import ControlLink
from proto import kv_transfer_pb2 as pb

from . import hostile, peers
from .conftest import FAST, BlockPool, random_caches, tiny_layout, wait_until
from .hostile import (
    CLOSE_BOUND_S,
    CTX,
    closed_by_peer,
    connect,
    pairs_at,
    round_trip,
    send_layers,
    wait_closed,
)

served = hostile.served  # the fixture


def _hello_from(address: str, source: str, spec) -> pb.HelloReply:
    """A sender's Hello from the address ``source``; the endpoint's reply."""
    link = ControlLink(connect(address, source), "probe", FAST.heartbeat_s, FAST.peer_timeout_s)
    try:
        hello = pb.Hello(spec=wire.spec_to_pb(spec), backend="tcp", sender_id="probe")
        link.send(pb.Frame(hello=hello))
        return link.recv_frame().hello_reply
    finally:
        link.close()


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
    # The sender returns once paired; the endpoint frees that socket's pending slot just
    # after (its own thread): wait for it, or the slot is counted against the flood.
    wait_until(lambda: not endpoint._pending, timeout=CLOSE_BOUND_S)
    threads_before = threading.active_count()
    held = [connect(endpoint.address) for _ in range(4)]  # accepted in connection order
    extra = [connect(endpoint.address) for _ in range(20)]
    try:
        wait_closed(extra, CLOSE_BOUND_S)
        assert endpoint.stats()["refused_connections"] == 20
        assert not any(closed_by_peer(s) for s in held), "an admitted socket was closed early"
        assert threading.active_count() <= threads_before + 4
        assert _hello_from(endpoint.address, "127.0.0.2", client.spec).ok  # another host
        round_trip(endpoint, client, pool, layout)  # the paired link is unaffected
    finally:
        for sock in held + extra:
            sock.close()
    wait_until(lambda: pairs_at(client.spec, endpoint.address), timeout=CLOSE_BOUND_S)
    round_trip(endpoint, client, pool, layout)


def test_security_silent_ucx_connection_is_closed():
    """The ucx listener is reachable by anyone: a connection that never sends its token
    is closed at the handshake deadline instead of holding a handler forever."""
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
            round_trip(endpoint, client, pool, layout)  # the listener still pairs senders
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
        socks = [connect(address) for _ in range(12)]  # twice the descriptors it has left
        wait_until(lambda: _accept_failed(proc.pid), timeout=10)
        for sock in socks:
            sock.close()
        layout, spec = peers._spec()
        client = make_client("tcp", spec, config=FAST)
        try:
            wait_until(lambda: pairs_at(spec, address), timeout=CLOSE_BOUND_S)
            tx = client.open(ticket)
            send_layers(tx, layout, random_caches(layout, 1), [0, 1, 2, 3])
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
    with open(f"/proc/{pid}/limits") as f:
        soft = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
    return len(os.listdir(f"/proc/{pid}/fd")) >= soft
