"""Bytes on the control link: framing, spec conversion, checksums and chunk plans.

A frame is ``<u32 little-endian length><serialized pb.Frame>``. A ``PageDescriptor``
frame may be followed by page bytes when the backend streams them inline (tcp).
Nothing here is pickled.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import torch
import xxhash

from engine.kv_cache.layout import KVLayoutSpec
from proto import kv_transfer_pb2 as pb

_LEN = struct.Struct("<I")
MAX_FRAME_BYTES = 64 << 20
"""Control frames are small; anything larger means a corrupt stream."""


def encode_frame(frame: pb.Frame) -> bytes:
    body = frame.SerializeToString()
    return _LEN.pack(len(body)) + body


def frame_length(prefix: bytes | memoryview) -> int:
    (length,) = _LEN.unpack(prefix)
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(
            f"control frame of {length} bytes exceeds {MAX_FRAME_BYTES}; the peer is not "
            "speaking the pdserve KV transfer protocol"
        )
    return length


def decode_frame(body: bytes | memoryview) -> pb.Frame:
    frame = pb.Frame()
    frame.ParseFromString(bytes(body))
    return frame


def spec_to_pb(spec: KVLayoutSpec) -> pb.LayoutSpec:
    return pb.LayoutSpec(
        model_fingerprint=spec.model_fingerprint,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_size=spec.block_size,
        protocol_version=spec.protocol_version,
    )


def spec_from_pb(msg: pb.LayoutSpec) -> KVLayoutSpec:
    return KVLayoutSpec(
        model_fingerprint=msg.model_fingerprint,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        dtype=msg.dtype,
        block_size=msg.block_size,
        protocol_version=msg.protocol_version,
    )


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Zero-copy ``memoryview`` of a contiguous CPU tensor's bytes."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


class Checksum:
    """Streaming xxh3-64 over a layer's K bytes then V bytes."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: torch.Tensor | memoryview) -> None:
        if isinstance(data, torch.Tensor):
            # xxh3 runs on the host: device pages (NCCL path) are hashed from a host copy.
            data = byte_view(data if data.device.type == "cpu" else data.cpu())
        self._h.update(data)

    def value(self) -> int:
        return self._h.intdigest()


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


def payload_sizes(desc, block_bytes: int) -> list[int]:
    """Byte size of every chunk of a descriptor's payload, in order."""
    plan = layer_plan(len(desc.block_ids), block_bytes, desc.chunk_bytes)
    return [(b - a) * block_bytes for _, a, b in plan]
