"""Moving KV pages between prefill and decode workers.

Decode worker (receiver)::

    endpoint = make_endpoint("tcp", layout, kv_caches, spec, free_blocks=engine.free)
    rx = endpoint.expect(block_ids, lease_s=30, on_done=done)   # rx.ticket goes to the router
    ... rx.poll() -> BOOTSTRAPPING / WAITING / TRANSFERRING / SUCCESS / FAILED
    done(transfer_id, SUCCESS | FAILED) once, from a transport thread

Prefill worker (sender)::

    client = make_client("tcp", spec)
    tx = client.open(ticket, on_done=done)
    for layer in ...: tx.send_layer(layer, k_cache, v_cache, src_block_ids=blocks)
    tx.finish(); ... tx.poll() until SUCCESS or FAILED

With ``TransferConfig(secret=...)`` on both sides the pairing is mutually authenticated
and tickets are signed by the endpoint and checked by the client (kv_transfer/auth.py).

Backends (``backend_names()``): shm, tcp, ucx, torch_dist; see kv_transfer/plane.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer.base import (
    EndpointArgs,
    FreeBlocks,
    HandshakeError,
    KVClient,
    KVEndpoint,
    KVReceiver,
    KVSender,
    OnDone,
    TicketRefused,
    TransferConfig,
    TransferState,
    TransferTicket,
    TransferTimings,
)
from kv_transfer.plane import backend_names, get_backend, register_backend

__all__ = [
    "HandshakeError",
    "KVClient",
    "KVEndpoint",
    "KVReceiver",
    "KVSender",
    "OnDone",
    "TicketRefused",
    "TransferConfig",
    "TransferState",
    "TransferTicket",
    "TransferTimings",
    "backend_names",
    "make_client",
    "make_endpoint",
    "register_backend",
]


def make_endpoint(
    backend: str,
    layout: KVLayout,
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    spec: KVLayoutSpec,
    free_blocks: FreeBlocks,
    *,
    epoch: int | None = None,
    config: TransferConfig | None = None,
) -> KVEndpoint:
    """Start a receiver endpoint writing into ``kv_caches`` (one (K, V) per layer).

    ``free_blocks`` is called from the endpoint's threads with the blocks of every
    transfer that fails (abort, lease expiry, dead sender); it must be thread-safe.
    ``epoch`` is the decode worker's incarnation (default: the current time in ns).
    """
    from kv_transfer.endpoint import Endpoint

    if len(kv_caches) != layout.num_layers:
        raise ValueError(
            f"{len(kv_caches)} (K, V) pairs for a layout of {layout.num_layers} layers"
        )
    args = EndpointArgs(
        layout=layout,
        spec=spec,
        kv_caches=kv_caches,
        free_blocks=free_blocks,
        epoch=time.time_ns() if epoch is None else epoch,
        config=config or TransferConfig(),
    )
    return Endpoint(get_backend(backend), args)


def make_client(
    backend: str, spec: KVLayoutSpec, *, config: TransferConfig | None = None
) -> KVClient:
    """A sender-side connector; pairs lazily with each endpoint it is given."""
    from kv_transfer.client import Client

    return Client(get_backend(backend), spec, config or TransferConfig())
