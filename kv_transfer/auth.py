"""Proving the cluster secret on the KV plane: the pairing handshake and signed tickets.

Pairing when the receiver has a secret (each nonce: 32 fresh random bytes)::

    sender                                            receiver
    Hello(spec, backend, sender_id, nonce_s)    ->
                                                <-    Challenge(nonce_r)
    Proof(H("hello", nonce_s, nonce_r, Hello))  ->    checks it; else HelloReply(ok=false),
                                                      refused_pairings += 1
                                                <-    HelloReply(..., mac=H("reply", nonce_s,
                                                      nonce_r, HelloReply))
    checks the mac; else HandshakeError

``H`` is HMAC-SHA256 keyed with the cluster secret (``engine.security``). The labels keep
one side's MAC from passing as the other's; each side's fresh nonce makes a recorded
exchange worthless the next time; the secret itself never crosses the wire. A sender
without a secret sends no nonce, and a receiver with one refuses it; a receiver without
one replies with no mac, and a sender with one refuses that.

Tickets: the receiver signs ``H("ticket", transfer id, endpoint, block ids, epoch, lease
deadline, backend[, TP part: decode rank, prefill rank, heads])``; the sender checks it before connecting to the ticket's endpoint, so
no Prefill RPC can point a prefill worker at an address the cluster did not issue.

Not covered: the page bytes themselves are neither encrypted nor MACed after pairing (the
xxh3 checksum catches corruption, not an attacker on the path); keep the KV plane on a
private network (the chart's NetworkPolicy).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import struct
from collections.abc import Mapping

from engine.security import ClusterSecret
from kv_transfer.base import TicketRefused, TransferTicket
from proto import kv_transfer_pb2 as pb

NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def matches(mac: bytes, expected: bytes) -> bool:
    """Constant-time comparison of a received MAC with the one computed here."""
    return hmac.compare_digest(bytes(mac), expected)


def _spec_parts(spec: pb.LayoutSpec) -> tuple[str, ...]:
    return (
        spec.model_fingerprint,
        str(spec.num_layers),
        str(spec.num_kv_heads),
        str(spec.head_dim),
        spec.dtype,
        str(spec.block_size),
        str(spec.protocol_version),
        f"{spec.tp_size}/{spec.tp_rank}/{spec.head_start}/{spec.head_end}",
        spec.kv_cache_dtype,
    )


def _map_parts(plane: Mapping[str, str]) -> tuple[str, ...]:
    # Last among the parts, so its variable count cannot shift another field.
    return tuple(part for key in sorted(plane) for part in (key, plane[key]))


def hello_mac(secret: ClusterSecret, hello: pb.Hello, challenge: bytes) -> bytes:
    """The sender's proof: the receiver's ``challenge`` and every field of its Hello."""
    return secret.sign(
        "pdserve-kv/hello",
        hello.nonce,
        challenge,
        hello.backend,
        hello.sender_id,
        *_spec_parts(hello.spec),
        *_map_parts(hello.plane),
    )


def reply_mac(secret: ClusterSecret, reply: pb.HelloReply, nonce: bytes, challenge: bytes) -> bytes:
    """The receiver's proof: both nonces and every field of its (accepting) HelloReply."""
    return secret.sign(
        "pdserve-kv/reply",
        nonce,
        challenge,
        str(reply.epoch),
        *_spec_parts(reply.spec),
        *_map_parts(reply.plane),
    )


def _ticket_parts(t: TransferTicket) -> tuple[bytes | str, ...]:
    parts = (
        "pdserve-kv/ticket",
        t.transfer_id,
        t.endpoint,
        struct.pack(f">{len(t.block_ids)}I", *t.block_ids),
        struct.pack(">Q", t.epoch),
        struct.pack(">d", t.lease_deadline),  # exact: a proto double round-trips bit for bit
        t.backend,
    )
    if t.heads is None:
        return parts
    return (*parts, struct.pack(">4I", t.tp_rank, t.src_rank, *t.heads))  # a TP part


def sign_ticket(secret: ClusterSecret | None, ticket: TransferTicket) -> TransferTicket:
    """``ticket`` with the receiver's signature (unchanged without a secret)."""
    if secret is None:
        return ticket
    return dataclasses.replace(ticket, signature=secret.sign(*_ticket_parts(ticket)))


def check_ticket(secret: ClusterSecret | None, ticket: TransferTicket, backend: str) -> None:
    """Raise :class:`TicketRefused` unless the cluster issued ``ticket`` for ``backend``.

    Without a secret there is nothing to check against (a laptop): every ticket passes.
    """
    if secret is None:
        return
    where = f"ticket {ticket.transfer_id!r} for KV endpoint {ticket.endpoint!r}"
    if not ticket.signature:
        raise TicketRefused(
            f"{where} is unsigned; this prefill worker has a cluster secret and streams KV "
            "only to endpoints the cluster issued (does the decode worker have the secret?)"
        )
    if ticket.backend != backend:
        raise TicketRefused(f"{where} is for backend {ticket.backend!r}, not {backend!r}")
    try:
        parts = _ticket_parts(ticket)
    except (struct.error, OverflowError) as exc:
        raise TicketRefused(f"{where} is malformed: {exc}") from None
    if not secret.verify(ticket.signature, *parts):
        raise TicketRefused(
            f"{where}: the signature does not match (a forged or altered ticket, or a decode "
            "worker with another cluster secret); not connecting"
        )
