"""The KV layout spec <-> its protobuf message (kv_transfer.proto ``LayoutSpec``): the
handshake and the worker's ``Info`` carry it."""

from __future__ import annotations

from engine.kv_cache.spec import KVLayoutSpec
from proto import kv_transfer_pb2 as pb


def spec_to_pb(spec: KVLayoutSpec) -> pb.LayoutSpec:
    return pb.LayoutSpec(
        model_fingerprint=spec.model_fingerprint,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_size=spec.block_size,
        protocol_version=spec.protocol_version,
        tp_size=spec.tp_size,
        tp_rank=spec.tp_rank,
        head_start=spec.head_start,
        head_end=spec.head_end,
        kv_cache_dtype=spec.kv_cache_dtype,
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
        tp_size=msg.tp_size or 1,
        tp_rank=msg.tp_rank,
        head_start=msg.head_start,
        head_end=msg.head_end,
        kv_cache_dtype=msg.kv_cache_dtype or "auto",
    )
