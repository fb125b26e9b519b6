"""The cluster secret on the KV plane: mutually authenticated pairing (no secret on the
wire, no replay) and signed tickets that a sender checks before it connects anywhere."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading

import pytest

from engine.kv_cache.spec import KVLayoutSpec
from engine.security import ClusterSecret
from kv_transfer import (
    HandshakeError,
    TicketRefused,
    TransferState,
    auth,
    make_client,
    make_endpoint,
    wire,
)
from kv_transfer.link import ControlLink, PeerLost
from proto import kv_transfer_pb2 as pb

from .conftest import (
    FAST,
    BlockPool,
    allocate_dst,
    backend_name,
    random_caches,
    tiny_layout,
    wait_until,
)

SECRET = ClusterSecret(b"kv-test-secret-0123456789abcdef")
OTHER = ClusterSecret(b"another-secret-0123456789abcdef")
S = TransferState


@dataclasses.dataclass
class Side:
    endpoint: object
    spec: KVLayoutSpec
    pool: BlockPool
    layout: object
    clients: list
    kv_pool: object = None

    def client(self, secret: ClusterSecret | None, backend: str | None = None):
        cfg = dataclasses.replace(FAST, secret=secret)
        client = make_client(backend or self.endpoint.backend.name, self.spec, config=cfg)
        self.clients.append(client)
        return client


@pytest.fixture
def serve():
    """``serve(backend, secret)``: an endpoint; closes it and its clients, checks leaks."""
    made: list[Side] = []

    def make(variant: str = "tcp", secret: ClusterSecret | None = SECRET) -> Side:
        layout = tiny_layout()
        spec = KVLayoutSpec.from_layout(layout, "test-model")
        pool = BlockPool(layout.num_blocks)
        cfg = dataclasses.replace(FAST, secret=secret)
        kv_pool, dst = allocate_dst(variant, layout)
        endpoint = make_endpoint(backend_name(variant), layout, dst, spec, pool.free, config=cfg)
        made.append(Side(endpoint, spec, pool, layout, [], kv_pool))
        return made[-1]

    yield make
    for side in made:
        for client in side.clients:
            client.close()
        side.endpoint.close()
        if side.kv_pool is not None:
            side.kv_pool.close()
        assert side.pool.num_free == side.pool.total


def _round_trip(side: Side, client) -> None:
    ids = side.pool.allocate(3)
    rx = side.endpoint.expect(ids, lease_s=30)
    tx = client.open(rx.ticket)
    src = random_caches(side.layout, 5)
    for layer in range(side.layout.num_layers):
        tx.send_layer(layer, *src[layer], src_block_ids=[7, 8, 9])
    wait_until(lambda: rx.poll().terminal and tx.poll().terminal, timeout=10)
    assert (rx.poll(), tx.poll()) == (S.SUCCESS, S.SUCCESS), (rx.error, tx.error)
    for layer in range(side.layout.num_layers):
        assert side.endpoint.args.kv_caches[layer][0][ids].equal(src[layer][0][[7, 8, 9]])
    side.pool.free(ids)


def test_security_paired_with_the_secret_on_every_backend(serve, backend):
    """Every backend pairs with the secret, its tickets are signed, and a sender without
    the secret is refused before the backend's data path is set up."""
    side = serve(backend)
    _round_trip(side, side.client(SECRET))
    rx = side.endpoint.expect(side.pool.allocate(1), lease_s=30)
    auth.check_ticket(SECRET, rx.ticket, backend_name(backend))
    rx.abort("test done")
    with pytest.raises(HandshakeError, match="requires the cluster secret"):
        side.client(None).connect(side.endpoint.address)
    wait_until(lambda: side.endpoint.stats()["refused_pairings"] == 1)


@pytest.mark.parametrize(
    ("sender", "receiver", "message"),
    [
        (None, SECRET, "requires the cluster secret and sender"),
        (OTHER, SECRET, "authentication failed"),
        (SECRET, None, r"is not authenticated \(it has no cluster secret\)"),
    ],
    ids=["sender-has-none", "wrong-secret", "receiver-has-none"],
)
def test_security_pairing_without_the_same_secret_is_refused(
    serve, caplog, sender, receiver, message
):
    side = serve("tcp", receiver)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(HandshakeError, match=message) as err:
            side.client(sender).connect(side.endpoint.address)
        if receiver is not None:  # the endpoint counts (and logs) what it refused
            wait_until(lambda: side.endpoint.stats()["refused_pairings"] == 1)
            wait_until(lambda: any("refused a sender" in r.message for r in caplog.records))
    said = " ".join([str(err.value), *(r.getMessage() for r in caplog.records)])
    for secret in (SECRET, OTHER):
        assert secret.key.decode() not in said and secret.key.hex() not in said
    _round_trip(side, side.client(receiver))  # the right secret still pairs


def _raw_link(address: str) -> ControlLink:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    return ControlLink(sock, "raw", FAST.heartbeat_s, FAST.peer_timeout_s)


def test_security_replayed_proof_is_refused(serve):
    """A recorded Hello and Proof, replayed on a new connection, fail: the endpoint's
    challenge is fresh each time."""
    side = serve()
    hello = pb.Hello(
        spec=wire.spec_to_pb(side.spec), backend="tcp", sender_id="rec", nonce=auth.new_nonce()
    )
    first = _raw_link(side.endpoint.address)
    try:
        first.send(pb.Frame(hello=hello))
        challenge = first.recv_frame().challenge.nonce
        proof = pb.Proof(mac=auth.hello_mac(SECRET, hello, challenge))
        first.send(pb.Frame(proof=proof))
        assert first.recv_frame().hello_reply.ok
    finally:
        first.close()
    replay = _raw_link(side.endpoint.address)
    try:
        replay.send(pb.Frame(hello=hello))
        assert replay.recv_frame().challenge.nonce != challenge
        replay.send(pb.Frame(proof=proof))
        reply = replay.recv_frame().hello_reply
    finally:
        replay.close()
    assert not reply.ok and "authentication failed" in reply.error
    wait_until(lambda: side.endpoint.stats()["refused_pairings"] == 1)


def test_security_receiver_that_cannot_prove_the_secret_is_refused(serve):
    """A fake endpoint challenges the sender, then accepts with a MAC it cannot make."""
    side = serve()
    server = socket.create_server(("127.0.0.1", 0))
    reply = pb.HelloReply(ok=True, spec=wire.spec_to_pb(side.spec), epoch=1)

    def fake() -> None:
        sock, _ = server.accept()
        link = ControlLink(sock, "fake", FAST.heartbeat_s, FAST.peer_timeout_s)
        hello = link.recv_frame().hello
        challenge = auth.new_nonce()
        link.send(pb.Frame(challenge=pb.Challenge(nonce=challenge)))
        link.recv_frame()  # the sender's proof, useless to the fake
        reply.mac = auth.reply_mac(OTHER, reply, hello.nonce, challenge)
        link.send(pb.Frame(hello_reply=reply))
        with contextlib.suppress(PeerLost):
            link.recv_frame()  # until the sender hangs up
        link.close()

    thread = threading.Thread(target=fake, daemon=True)
    thread.start()
    try:
        with pytest.raises(HandshakeError, match="did not prove the cluster secret"):
            side.client(SECRET).connect(f"127.0.0.1:{server.getsockname()[1]}")
    finally:
        thread.join(10)
        server.close()


def _forge(ticket, field: str, trap: str):
    if field == "endpoint":
        return dataclasses.replace(ticket, endpoint=trap)
    if field == "block_ids":
        return dataclasses.replace(ticket, block_ids=(*ticket.block_ids[:-1], 63))
    if field == "lease_deadline":
        return dataclasses.replace(ticket, lease_deadline=ticket.lease_deadline + 3600)
    if field == "unsigned":
        return dataclasses.replace(ticket, signature=b"")
    if field == "other-secret":
        return auth.sign_ticket(OTHER, ticket)
    return dataclasses.replace(ticket, **{field: getattr(ticket, field) + 1})  # epoch


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("endpoint", "signature does not match"),
        ("block_ids", "signature does not match"),
        ("epoch", "signature does not match"),
        ("lease_deadline", "signature does not match"),
        ("unsigned", "is unsigned"),
        ("other-secret", "signature does not match"),
    ],
)
def test_security_forged_ticket_is_refused_before_connecting(serve, field, message):
    side = serve()
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    try:
        ids = side.pool.allocate(2)
        rx = side.endpoint.expect(ids, lease_s=30)
        assert rx.ticket.signature and rx.ticket.backend == "tcp"
        client = side.client(SECRET)
        forged = _forge(rx.ticket, field, f"127.0.0.1:{trap.getsockname()[1]}")
        with pytest.raises(TicketRefused, match=message):
            client.open(forged)
        with pytest.raises(BlockingIOError):  # connect() would have queued it here by now
            trap.accept()
        assert not client._links, "the client connected before checking the ticket"
        tx = client.open(rx.ticket)  # the genuine ticket still works
        wait_until(lambda: tx.poll() is S.WAITING)
        rx.abort("test done")
    finally:
        trap.close()
    wait_until(lambda: side.pool.num_free == side.pool.total)


def test_security_ticket_for_another_backend_is_refused(serve):
    side = serve("tcp")
    rx = side.endpoint.expect(side.pool.allocate(1), lease_s=30)
    with pytest.raises(TicketRefused, match="is for backend 'tcp', not 'shm'"):
        side.client(SECRET, backend="shm").open(rx.ticket)
    rx.abort("test done")


def test_pairing_skips_heartbeats_mid_handshake(serve):
    """A side kept waiting past its heartbeat interval sends a heartbeat mid-handshake
    (seen on a loaded box: "expected hello_reply during the handshake, got heartbeat");
    both sides skip it. The real endpoint gets one before the Hello and one before the
    Proof; the real client gets one before the Challenge and one before the HelloReply."""
    side = serve()
    beat = pb.Frame(heartbeat=pb.Heartbeat())
    hello = pb.Hello(spec=wire.spec_to_pb(side.spec), backend="tcp", sender_id="hb", nonce=auth.new_nonce())  # fmt: skip
    raw = _raw_link(side.endpoint.address)
    try:
        raw.send(beat)
        raw.send(pb.Frame(hello=hello))
        challenge = raw.recv_frame().challenge.nonce
        raw.send(beat)
        raw.send(pb.Frame(proof=pb.Proof(mac=auth.hello_mac(SECRET, hello, challenge))))
        reply = raw.recv_frame().hello_reply
        assert reply.ok, reply.error
    finally:
        raw.close()
    server = socket.create_server(("127.0.0.1", 0))

    def receiver() -> None:  # the real protocol, a heartbeat before each of its frames
        sock, _ = server.accept()
        link = ControlLink(sock, "beating", FAST.heartbeat_s, FAST.peer_timeout_s)
        got = link.recv_frame().hello
        nonce = auth.new_nonce()
        link.send(beat)
        link.send(pb.Frame(challenge=pb.Challenge(nonce=nonce)))
        link.recv_frame()  # the proof
        ok = pb.HelloReply(ok=True, spec=wire.spec_to_pb(side.spec), epoch=1)
        ok.mac = auth.reply_mac(SECRET, ok, got.nonce, nonce)
        link.send(beat)
        link.send(pb.Frame(hello_reply=ok))
        with contextlib.suppress(PeerLost):
            link.recv_frame()  # until the sender hangs up
        link.close()

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    try:
        side.client(SECRET).connect(f"127.0.0.1:{server.getsockname()[1]}")
    finally:
        side.clients[-1].close()
        thread.join(10)
        server.close()
