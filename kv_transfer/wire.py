"""Bytes on the control link: framing, checksums and chunk plans; tickets <-> protobuf.

A frame is ``<u32 little-endian length><serialized pb.Frame>``. A ``PageDescriptor``
frame may be followed by page bytes when the backend streams them inline (tcp): exactly
``k_bytes + v_bytes`` of them, then a ``PageTrailer`` if ``checksum_in_trailer``.
Nothing here is pickled.

Frame size limits: until a peer has proved itself (Hello, and with a secret the Proof)
a frame may not exceed ``HANDSHAKE_MAX_FRAME_BYTES``, so an unknown peer cannot make the
receiver allocate more than that per socket; after pairing the receiver accepts what the
largest descriptor of its layout needs (``paired_frame_limit``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import torch
import xxhash
from google.protobuf.message import DecodeError

from engine.kernels import cpu_kv_copy
from engine.kv_cache.spec_pb import spec_from_pb, spec_to_pb  # noqa: F401 (the handshake uses them)
from kv_transfer.base import TransferTicket
from proto import kv_transfer_pb2 as pb
from proto import worker_pb2

_LEN = struct.Struct("<I")
HANDSHAKE_MAX_FRAME_BYTES = 64 << 10
"""Bound on every frame before pairing, and on every frame a sender receives."""
MAX_SKIP_MESSAGE_BYTES = 64 << 20
"""Largest data-path message a receiver allocates to skip a malformed descriptor."""
MAX_ERROR_CHARS = 2048
"""Error strings put on the wire are cut to this, so they fit any frame limit."""


class FrameError(ValueError):
    """A frame over its size limit, or bytes that do not parse as a Frame."""


def encode_frame(frame: pb.Frame) -> bytes:
    body = frame.SerializeToString()
    return _LEN.pack(len(body)) + body


def paired_frame_limit(num_blocks: int) -> int:
    """Largest frame a paired receiver accepts: a descriptor naming every block (a block
    id is at most a 5-byte varint plus framing) with room for the other fields."""
    return HANDSHAKE_MAX_FRAME_BYTES + 8 * num_blocks


def frame_length(prefix: bytes | memoryview, limit: int = HANDSHAKE_MAX_FRAME_BYTES) -> int:
    (length,) = _LEN.unpack(prefix)
    if length > limit:
        raise FrameError(
            f"control frame of {length} bytes exceeds the limit of {limit} bytes; the peer "
            "is not speaking the pdserve KV transfer protocol"
        )
    return length


def decode_frame(body: bytes | memoryview) -> pb.Frame:
    frame = pb.Frame()
    try:
        frame.ParseFromString(bytes(body))
    except DecodeError as exc:
        raise FrameError(f"malformed control frame of {len(body)} bytes: {exc}") from None
    return frame


def clip(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS`` for a frame."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Zero-copy ``memoryview`` of a contiguous CPU tensor's bytes."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


CHECKSUMS = ("xxh3", "crc32c", "none")
"""What a plane may check pages with (``Capabilities.checksum``)."""


class Checksum:
    """Streaming checksum over a layer's K bytes then V bytes: xxh3-64 (the default),
    hardware CRC32C (engine/kernels/csrc/kv_copy_cpu.c) or none (always 0)."""

    def __init__(self, kind: str = "xxh3") -> None:
        if kind not in CHECKSUMS:
            raise ValueError(f"unknown checksum {kind!r}; choose one of {CHECKSUMS}")
        self.kind = kind
        self._h = xxhash.xxh3_64() if kind == "xxh3" else None
        self._crc = 0
        if kind == "crc32c" and not cpu_kv_copy.available():
            raise ValueError("checksum crc32c needs the CPU kernels (a C compiler); use xxh3")

    def update(self, data: torch.Tensor | memoryview) -> None:
        if self.kind == "none":
            return
        if isinstance(data, torch.Tensor):
            # Hashing runs on the host: device pages are hashed from a host copy (which is
            # why NCCL checks none).
            data = byte_view(data if data.device.type == "cpu" else data.cpu())
        if self._h is not None:
            self._h.update(data)
        else:
            self._crc = cpu_kv_copy.crc32c(data, self._crc)

    def value(self) -> int:
        return self._h.intdigest() if self._h is not None else self._crc


def chunk_plan(num_blocks: int, block_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Block ranges ``[start, stop)`` of about ``chunk_bytes`` each, covering ``num_blocks``.

    Both sides derive the same plan from the descriptor, so chunked data paths
    (ucx, torch_dist) post receives of exactly the sizes that were sent.
    """
    step = max(1, chunk_bytes // block_bytes)
    for start in range(0, num_blocks, step):
        yield start, min(num_blocks, start + step)


def layer_plan(num_blocks: int, block_bytes: int, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """``(kv, start, stop)`` chunks of one layer's payload: K blocks, then V blocks."""
    step = list(chunk_plan(num_blocks, block_bytes, chunk_bytes))
    return [(kv, a, b) for kv in (0, 1) for a, b in step]


def desc_plan(desc, block_bytes: int) -> list[tuple[int, int, int]]:
    """``(kv, start, stop)`` messages of a descriptor's payload: its ``message_blocks``
    (kv_transfer/messages.py) when it names them, else chunks of ``chunk_bytes``."""
    if not desc.message_blocks:
        return layer_plan(len(desc.block_ids), block_bytes, desc.chunk_bytes)
    spans, a = [], 0
    for m in desc.message_blocks:
        spans.append((a, a + m))
        a += m
    return [(kv, a, b) for kv in (0, 1) for a, b in spans]


def plan_problem(desc) -> str | None:
    """Why a descriptor's ``message_blocks`` cannot describe its blocks, if they cannot."""
    m = desc.message_blocks
    if m and (sum(m) != len(desc.block_ids) or min(m) == 0):
        return f"message_blocks sum to {sum(m)} (least {min(m)}), not its {len(desc.block_ids)} blocks"  # fmt: skip
    return None


def payload_sizes(desc, block_bytes: int) -> list[int]:
    """Byte size of every chunk of a descriptor's payload, in order."""
    return [(b - a) * block_bytes for _, a, b in desc_plan(desc, block_bytes)]


def skippable_sizes(desc, max_message: int) -> list[int]:
    """The message sizes a chunked sender (ucx, torch_dist) sends for ``desc``, derived
    from the descriptor alone as the sender derives them, for a receiver to skip.

    Raises ``FrameError`` where they are undefined (no blocks, fewer bytes than blocks,
    a checksum trailer: nothing can have been sent that way) or one exceeds
    ``max_message`` (the receiver will not allocate it).
    """
    n = len(desc.block_ids)
    if n == 0 or desc.k_bytes < n or desc.checksum_in_trailer or plan_problem(desc):
        raise FrameError(f"a descriptor for {n} blocks of {desc.k_bytes} bytes cannot be skipped")
    sizes = payload_sizes(desc, desc.k_bytes // n)
    if max(sizes) > max_message:
        raise FrameError(f"cannot skip a {max(sizes)}-byte message (over {max_message} bytes)")
    return sizes


def ticket_to_pb(t: TransferTicket, backend: str | None = None) -> worker_pb2.TransferTicket:
    """``backend`` only for a ticket that does not name one (the signature covers it)."""
    return worker_pb2.TransferTicket(
        transfer_id=t.transfer_id,
        endpoint=t.endpoint,
        block_ids=list(t.block_ids),
        epoch=t.epoch,
        lease_deadline=t.lease_deadline,
        backend=t.backend or backend or "",
        signature=t.signature,
        tp_rank=t.tp_rank,
        src_rank=t.src_rank,
        head_start=t.heads[0] if t.heads else 0,
        head_end=t.heads[1] if t.heads else 0,
    )


def ticket_from_pb(msg: worker_pb2.TransferTicket) -> TransferTicket:
    return TransferTicket(
        transfer_id=msg.transfer_id,
        endpoint=msg.endpoint,
        block_ids=tuple(msg.block_ids),
        epoch=msg.epoch,
        lease_deadline=msg.lease_deadline,
        backend=msg.backend,
        signature=msg.signature,
        tp_rank=msg.tp_rank,
        src_rank=msg.src_rank,
        heads=(msg.head_start, msg.head_end) if msg.head_end else None,
    )
