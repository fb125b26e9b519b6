"""Backend data paths ("planes") and the registry that builds them by name.

Every backend shares the same control link (framed protobuf over TCP, see link.py)
and differs only in how a layer's page bytes travel. Per link the bytes pass::

    sender:   staging(n) -> gather + checksum into it -> send(descriptor, staging)
    receiver: descriptor -> chunks(descriptor, sizes) -> checksum + scatter each chunk

Each plane declares what its data path can do in a :class:`Capabilities` record, fixed
when it is paired (the client and the endpoint read it, never probe for methods):

- ``zero_copy_send`` (sender ``send_parts(desc, views)``): page bytes go straight from the
  source blocks, hashed on the way, checksum in a ``PageTrailer`` (tcp);
- ``max_payload_bytes``: the sender splits a layer into descriptors of at most this (shm);
- ``chunk_bytes``: message size fixed at pairing (torch_dist), overriding the config;
  ``default_chunk_bytes``: the size used when the config sets none (ucx: 4 MiB);
- ``direct_recv`` (receiver ``recv_views(views)`` / ``scratch(n)`` / ``trailer(desc)``):
  page bytes land straight in the destination blocks, the trailer follows them (tcp);
- ``same_host_only``: the data path needs both sides on one host (shm);
- ``writes_in_place`` (sender ``begin(ticket)`` / ``write_layer(job)`` / ``end(ticket)``):
  the sender copies each layer straight into the receiver's destination blocks, in a pool
  both processes map (shm with a shared KV pool), and the descriptor only says it is done;
  the receiver's host guards those writes with a fence (shm_fence.py);
- ``run_messages`` (receiver ``chunks(desc, sizes, targets)``, sender
  ``send_messages(desc, parts)``): one message per run of blocks consecutive on both sides,
  straight from and into the caches (kv_transfer/messages.py), short runs through
  staging (torch_dist, ucx);
- ``checksum``: ``xxh3``, ``crc32c`` or ``none``, fixed by the receiver at pairing (plane
  option ``checksum`` overrides a backend's default): xxh3 where bytes cross a wire (tcp,
  ucx, gloo), none within one host's memory (shm) and on NCCL (bench/RESULTS.md, "Integrity").

A descriptor whose pages cannot be received fails its own transfer only: the plane
raises ``BadDescriptor`` from ``chunks`` (having released what the sender must get
back), or the endpoint calls ``discard`` to skip a payload whose sizes do not fit the
layout. Only a stream that cannot be resynced raises ``PeerLost`` and ends the link.

A backend module exposes ``BACKEND: Backend``. The registry maps a name to that module
and imports it only when the backend is first used, so a missing optional library
(ucxx) only affects its own backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kv_transfer.base import EndpointArgs, TransferConfig
from kv_transfer.link import ControlLink
from proto import kv_transfer_pb2 as pb


@dataclass(frozen=True)
class Capabilities:
    """What one paired plane's data path can do; see the module docstring."""

    zero_copy_send: bool = False
    direct_recv: bool = False
    max_payload_bytes: int | None = None
    chunk_bytes: int | None = None
    default_chunk_bytes: int = 1 << 20
    same_host_only: bool = False
    writes_in_place: bool = False
    run_messages: bool = False
    run_min_bytes: int = 256 << 10
    """With ``run_messages``: shorter runs are staged (plane option ``run_min_bytes``)."""
    checksum: str = "xxh3"


BASIC = Capabilities()
"""A data path that stages every layer and needs nothing else."""


class BadDescriptor(Exception):
    """This descriptor's pages cannot be received, but the link is still in sync."""


class Fence(Protocol):
    """Who may write a transfer's blocks from another process (shm_fence.py); the endpoint
    claims the blocks before the ticket leaves and revokes them when the transfer ends."""

    def claim(self, transfer_id: str, block_ids: Sequence[int]) -> None: ...

    def revoke(self, transfer_id: str, block_ids: Sequence[int], then: Callable[[], None]) -> None:
        """Call ``then()`` once no writer can write ``block_ids`` any more (at once, or from
        a thread once the writer let go or died)."""


class NoFence:
    """Backends whose pages only the receiver's own threads write."""

    def claim(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        pass

    def revoke(self, transfer_id: str, block_ids: Sequence[int], then: Callable[[], None]) -> None:
        then()


NO_FENCE = NoFence()


def checksum_kind(config: TransferConfig, default: str) -> str:
    """The receiver's checksum for its planes: the ``checksum`` plane option, else
    ``default``; refused at start when unknown."""
    from kv_transfer.wire import CHECKSUMS

    kind = config.plane.get("checksum", default)
    if kind not in CHECKSUMS:
        raise ValueError(
            f"unknown checksum {kind!r} in the plane options; choose one of {CHECKSUMS}"
        )
    return kind


class SenderPlane(Protocol):
    """Sender half of a data path; used only by its link's writer thread."""

    capabilities: Capabilities

    def staging(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` to fill with K then V pages (may wait for space)."""

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        """Send the descriptor on the link and the staged bytes on the data path."""

    def on_frame(self, frame: pb.Frame) -> bool:
        """Handle a plane-level control frame (e.g. shm Release); True if consumed."""

    def close(self) -> None: ...


class ReceiverPlane(Protocol):
    """Receiver half of a data path; used only by its link's reader thread."""

    capabilities: Capabilities

    def chunks(self, desc: pb.PageDescriptor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
        """Yield the descriptor's bytes as uint8 chunks of ``sizes``; always exhaust it.

        Raises ``BadDescriptor`` before the first chunk if they cannot be read."""

    def discard(self, desc: pb.PageDescriptor) -> None:
        """Consume the payload as the sender sent it (sizes from the descriptor alone),
        writing nothing; ``PeerLost`` if the data path cannot skip it."""

    def on_frame(self, frame: pb.Frame) -> bool:
        """Handle a plane-level control frame; True if consumed."""

    def close(self) -> None: ...


class PlaneHost(Protocol):
    """Per-endpoint resources of a backend (a store, a listener, a shared pool's fence)."""

    fence: Fence

    def accept(
        self, link: ControlLink, hello: pb.Hello
    ) -> tuple[dict[str, str], Callable[[], ReceiverPlane]]:
        """Parameters for the HelloReply, and a callable that finishes pairing after it."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    """A named data path: how the endpoint hosts it and how a sender connects to it."""

    name: str
    host: Callable[[EndpointArgs], PlaneHost]
    connect: Callable[[ControlLink, Mapping[str, str], TransferConfig], SenderPlane]


_REGISTRY: dict[str, str] = {
    "tcp": "kv_transfer.backends.tcp",
    "shm": "kv_transfer.backends.shm",
    "torch_dist": "kv_transfer.backends.torch_dist",
    "ucx": "kv_transfer.backends.ucx",
}


def backend_names() -> list[str]:
    """Every registered backend name."""
    return list(_REGISTRY)


def register_backend(name: str, module: str) -> None:
    """Add (or replace) a backend: ``module`` must define ``BACKEND``."""
    _REGISTRY[name] = module


def get_backend(name: str) -> Backend:
    """Import and return the backend registered as ``name``."""
    try:
        module = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; choose one of {sorted(_REGISTRY)}"
        ) from None
    return importlib.import_module(module).BACKEND


class SimpleHost:
    """A PlaneHost for backends with no per-endpoint resources."""

    fence: Fence = NO_FENCE

    def __init__(self, make: Callable[[ControlLink], ReceiverPlane]):
        self._make = make

    def accept(
        self, link: ControlLink, hello: pb.Hello
    ) -> tuple[dict[str, str], Callable[[], ReceiverPlane]]:
        return {}, lambda: self._make(link)

    def close(self) -> None:
        pass
