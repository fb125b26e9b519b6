"""The pairing handshake on a new control link, both sides (auth.py has the proofs).

    sender_handshake:    Hello -> [Challenge -> Proof] -> HelloReply (checked) -> reply
    receiver_handshake:  Hello (secret? -> Challenge -> Proof checked) -> layout checked
                         -> backend accept -> HelloReply -> finish() -> ReceiverPlane

Every read before the peer proved itself is bounded by a deadline and by the link's
pre-pairing frame limit. A refusal is a HandshakeError naming why (never the secret);
the receiver tells the sender in a HelloReply(ok=false) when it can.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.kv_cache.spec import KVLayoutSpec
from engine.security import ClusterSecret
from kv_transfer import auth, tp_map, wire
from kv_transfer.base import HandshakeError
from kv_transfer.link import ControlLink
from kv_transfer.plane import PlaneHost, ReceiverPlane
from proto import kv_transfer_pb2 as pb

_SET_THE_SECRET = "give every worker the same cluster secret (--cluster-secret-file)"


def _next(link: ControlLink, deadline: float) -> pb.Frame:
    """The peer's next handshake frame. Heartbeats are skipped: a side kept waiting past
    its heartbeat interval (a busy machine, a slow backend accept) sends one mid-handshake,
    which is liveness, not a protocol error (``deadline`` still bounds the wait)."""
    while True:
        frame = link.recv_frame(deadline)
        if not frame.HasField("heartbeat"):
            return frame


def _expect(frame: pb.Frame, kind: str) -> pb.Frame:
    got = frame.WhichOneof("kind")
    if got != kind:
        raise HandshakeError(f"expected {kind} during the handshake, got {got}")
    return frame


@dataclass(frozen=True)
class ReceiverSide:
    """What the receiver pairs with: its layout, backend, epoch, secret and data path."""

    spec: KVLayoutSpec
    backend: str
    epoch: int
    secret: ClusterSecret | None
    host: PlaneHost
    paired_frame_limit: int


def receiver_handshake(link: ControlLink, side: ReceiverSide, timeout_s: float) -> ReceiverPlane:
    """Pair with the sender on ``link``; raises HandshakeError / PeerLost on refusal."""
    deadline = time.monotonic() + timeout_s
    hello = _expect(_next(link, deadline), "hello").hello
    reply = pb.HelloReply(spec=wire.spec_to_pb(side.spec), epoch=side.epoch)
    try:
        challenge = _authenticate_sender(link, side.secret, hello, deadline)
        _check_hello(side, hello)
    except HandshakeError as exc:
        reply.ok, reply.error = False, wire.clip(str(exc))
        link.try_send(pb.Frame(hello_reply=reply))
        raise
    params, finish = side.host.accept(link, hello)
    reply.ok = True
    reply.plane.update(params)
    if side.secret is not None:
        reply.mac = auth.reply_mac(side.secret, reply, hello.nonce, challenge)
    link.max_frame_bytes = side.paired_frame_limit  # the peer proved itself
    link.send(pb.Frame(hello_reply=reply))
    return finish()


def _authenticate_sender(
    link: ControlLink, secret: ClusterSecret | None, hello: pb.Hello, deadline: float
) -> bytes:
    """Challenge the sender and check its proof; the challenge (b"" without a secret)."""
    if secret is None:
        return b""
    who = f"sender {hello.sender_id[:64]!r}"
    if len(hello.nonce) != auth.NONCE_BYTES:
        why = (
            "sent no nonce, so it has no cluster secret"
            if not hello.nonce
            else "sent a malformed nonce"
        )
        raise HandshakeError(
            f"this KV endpoint requires the cluster secret and {who} {why}; {_SET_THE_SECRET}"
        )
    challenge = auth.new_nonce()
    link.send(pb.Frame(challenge=pb.Challenge(nonce=challenge)))
    proof = _expect(_next(link, deadline), "proof").proof
    if not auth.matches(proof.mac, auth.hello_mac(secret, hello, challenge)):
        raise HandshakeError(
            f"authentication failed: {who}'s proof does not match this endpoint's cluster "
            f"secret (another secret, or a replayed or forged handshake); {_SET_THE_SECRET}"
        )
    return challenge


def _check_hello(side: ReceiverSide, hello: pb.Hello) -> None:
    if hello.backend != side.backend:
        raise HandshakeError(
            f"backend mismatch: prefill={hello.backend[:64]}, decode={side.backend}; "
            "start both workers with the same --kv-transport"
        )
    theirs = wire.spec_from_pb(hello.spec)
    try:
        side.spec.check_compatible(theirs, ours="decode", theirs="prefill")
        tp_map.check_pairable(side.spec, theirs, "decode", "prefill")
    except ValueError as exc:
        raise HandshakeError(str(exc)) from None


def sender_handshake(
    link: ControlLink,
    endpoint: str,
    hello: pb.Hello,
    secret: ClusterSecret | None,
    timeout_s: float,
) -> pb.HelloReply:
    """Send ``hello`` (its nonce is set here) and return the receiver's checked reply."""
    deadline = time.monotonic() + timeout_s
    hello.nonce = auth.new_nonce() if secret is not None else b""
    link.send(pb.Frame(hello=hello))
    frame = _next(link, deadline)
    challenge = b""
    if frame.HasField("challenge"):
        challenge = frame.challenge.nonce
        if secret is None:
            raise HandshakeError(
                f"{endpoint} requires the cluster secret and this prefill worker has none; "
                + _SET_THE_SECRET
            )
        if len(challenge) != auth.NONCE_BYTES:
            raise HandshakeError(f"{endpoint} sent a malformed challenge")
        link.send(pb.Frame(proof=pb.Proof(mac=auth.hello_mac(secret, hello, challenge))))
        frame = _next(link, deadline)
    reply = _expect(frame, "hello_reply").hello_reply
    if not reply.ok:
        raise HandshakeError(f"{endpoint} refused pairing: {reply.error}")
    _check_receiver(endpoint, secret, reply, hello.nonce, challenge)
    return reply


def _check_receiver(
    endpoint: str,
    secret: ClusterSecret | None,
    reply: pb.HelloReply,
    nonce: bytes,
    challenge: bytes,
) -> None:
    if secret is None:
        return
    if not challenge:
        raise HandshakeError(
            f"{endpoint} is not authenticated (it has no cluster secret) but this prefill "
            f"worker has one, so it sends it no KV; {_SET_THE_SECRET}"
        )
    if not auth.matches(reply.mac, auth.reply_mac(secret, reply, nonce, challenge)):
        raise HandshakeError(
            f"{endpoint} did not prove the cluster secret (another secret, or a forged reply)"
        )
