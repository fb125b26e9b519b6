"""Hypothesis strategies for the KV control protocol: frames of every kind, with fields
near what a real peer sends and far from it, and byte streams mixing them with garbage."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from kv_transfer import wire
from proto import kv_transfer_pb2 as pb

U32, U64 = 2**32 - 1, 2**64 - 1
SHORT = st.text(max_size=12)
U32S = st.one_of(st.integers(0, 70), st.sampled_from([U32, 2**31]), st.integers(0, U32))
U64S = st.one_of(st.integers(0, 1 << 17), st.sampled_from([U64, 2**63]), st.integers(0, U64))

SPECS = st.builds(
    pb.LayoutSpec, model_fingerprint=SHORT, num_layers=U32S, num_kv_heads=U32S,
    head_dim=U32S, dtype=st.sampled_from(["float32", "bfloat16", "", "int8"]),
    block_size=U32S, protocol_version=U32S,
)  # fmt: skip
PLANE = st.dictionaries(SHORT, SHORT, max_size=3)
DESCRIPTORS = st.builds(
    pb.PageDescriptor, transfer_id=SHORT, epoch=U64S, layer=U32S,
    block_ids=st.lists(U32S, max_size=12), k_bytes=U64S, v_bytes=U64S, checksum=U64S,
    chunk_bytes=U64S, checksum_in_trailer=st.booleans(),
    shm=st.builds(pb.ShmRegion, name=SHORT, size=U64S, offset=U64S),
)  # fmt: skip
KINDS = {
    "hello": st.builds(
        pb.Hello,
        spec=SPECS,
        backend=st.sampled_from(["tcp", "shm", "x"]),
        sender_id=SHORT,
        plane=PLANE,
        nonce=st.binary(max_size=40),
    ),  # fmt: skip
    "hello_reply": st.builds(
        pb.HelloReply,
        ok=st.booleans(),
        error=SHORT,
        spec=SPECS,
        plane=PLANE,
        epoch=U64S,
        mac=st.binary(max_size=40),
    ),  # fmt: skip
    "open": st.builds(pb.Open, transfer_id=SHORT, epoch=U64S),
    "pages": DESCRIPTORS,
    "abort": st.builds(pb.Abort, transfer_id=SHORT, epoch=U64S, reason=SHORT),
    "status": st.builds(pb.Status, transfer_id=SHORT, state=st.integers(0, 5), error=SHORT),
    "release": st.builds(pb.Release, name=SHORT),
    "heartbeat": st.just(pb.Heartbeat()),
    "trailer": st.builds(pb.PageTrailer, transfer_id=SHORT, layer=U32S, checksum=U64S),
    "challenge": st.builds(pb.Challenge, nonce=st.binary(max_size=40)),
    "proof": st.builds(pb.Proof, mac=st.binary(max_size=40)),
}


@st.composite
def frames(draw, kinds: tuple[str, ...] = tuple(KINDS)) -> pb.Frame:
    kind = draw(st.sampled_from(kinds))
    frame = pb.Frame()
    getattr(frame, kind).CopyFrom(draw(KINDS[kind]))
    return frame


def _prefix(n: int) -> bytes:
    return struct.pack("<I", n)


PIECES = st.one_of(
    frames().map(wire.encode_frame),
    frames().map(wire.encode_frame).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
    st.sampled_from(
        [U32, 64 << 20, wire.HANDSHAKE_MAX_FRAME_BYTES, wire.HANDSHAKE_MAX_FRAME_BYTES + 1]
    ).map(_prefix),  # fmt: skip
    st.integers(0, 300).map(_prefix),
    st.binary(max_size=64),
)
"""Whole frames, truncated frames, bare length prefixes (huge, at the limit, small) and
raw bytes."""

STREAMS = st.lists(PIECES, max_size=6).map(b"".join)
"""What a hostile or broken peer writes on a KV socket."""
