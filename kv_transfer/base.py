"""The KV transfer interface: states, tickets, config and the role protocols.

A transfer moves one request's KV pages from a prefill worker (sender) to a decode
worker (receiver). Each side sees it pass through these states::

    receiver:  expect() -> BOOTSTRAPPING -> (sender opens) WAITING
                        -> (first layer) TRANSFERRING -> (all layers, checksums ok) SUCCESS
    sender:    open()   -> BOOTSTRAPPING -> (receiver accepts) WAITING
                        -> (first layer pushed) TRANSFERRING -> (receiver confirms) SUCCESS

Any state can turn FAILED: abort from either side, lease expiry, a checksum mismatch,
or a dead peer (no frame for ``peer_timeout_s``). On FAILED the receiver hands its
reserved blocks back through ``free_blocks``; pages that arrive later are dropped and
counted, never written. ``poll()`` never blocks.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from engine.config.transfer import TransferConfig
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.spec import KVLayoutSpec

logger = logging.getLogger(__name__)

FreeBlocks = Callable[[list[int]], None]
"""Hook through which the receiver returns reserved blocks to its engine's pool."""
OnDone = Callable[[str, "TransferState"], None]
"""``on_done(transfer_id, state)``: called once, from a transport thread (or the caller's,
for an abort), when a transfer ends SUCCESS or FAILED; on the receiver's FAILED only after
``free_blocks`` (no transport thread touches the blocks any more). An owner that runs its
engine on one thread posts it as an event there."""


def report_done(on_done: OnDone | None, transfer_id: str, state: TransferState) -> None:
    """Call ``on_done`` (from a transport thread); its failure must not end that thread."""
    if on_done is None:
        return
    try:
        on_done(transfer_id, state)
    except Exception:
        logger.exception("on_done of transfer %s failed", transfer_id)


class TransferState(enum.Enum):
    """Where a transfer stands; see the module docstring for the transitions."""

    BOOTSTRAPPING = "bootstrapping"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class HandshakeError(ValueError):
    """Pairing refused: the two workers disagree on layout, backend or cluster secret."""


class TicketRefused(ValueError):
    """A ticket's signature does not prove the cluster issued it (forged or unsigned)."""


@dataclass(frozen=True)
class TransferTicket:
    """What the receiver hands out (through the router) to the sender."""

    transfer_id: str
    """Unique id of this transfer on the receiver."""
    endpoint: str
    """Receiver address, ``host:port``."""
    block_ids: tuple[int, ...]
    """Destination blocks on the receiver, in the request's token order."""
    epoch: int
    """The receiver's owner epoch; pages for another epoch are dropped."""
    lease_deadline: float
    """Wall-clock time (``time.time()``) after which the receiver frees the blocks."""
    backend: str = ""
    """The receiver endpoint's backend (``tcp``, ``shm``, ...)."""
    signature: bytes = field(default=b"", repr=False)
    """The receiver's HMAC over every other field (kv_transfer/auth.py); empty when the
    receiver has no cluster secret."""
    tp_rank: int = 0
    """Tensor-parallel groups: the decode rank whose cache (and endpoint) this is."""
    src_rank: int = 0
    """Tensor-parallel groups: the prefill rank that sends this part."""
    heads: tuple[int, int] | None = None
    """Global KV heads ``[start, end)`` this part carries (kv_transfer/tp_map.py);
    ``None``: every head the receiver holds."""


@dataclass(frozen=True)
class TransferTimings:
    """How a finished transfer went, on the receiver's clock (its owner reports them)."""

    seconds: float
    """From the first page arriving to SUCCESS."""
    tail_seconds: float
    """From the sender queuing its last layer (``send_layer``) to SUCCESS: the part of the
    transfer the prefill's compute did not hide (the descriptor's ``sender_delay_us`` plus
    the receiver's own time after it)."""


@runtime_checkable
class KVSender(Protocol):
    """Prefill side of one transfer."""

    ticket: TransferTicket

    def send_layer(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        src_block_ids: Sequence[int] | None = None,
    ) -> None:
        """Queue one layer's pages; returns at once.

        Without ``src_block_ids``, ``k`` and ``v`` are pages ``[n, block_size, kv_heads,
        head_dim]`` for the ticket's ``n`` blocks. With it, they are the layer's whole K
        and V cache and the pages are gathered from ``src_block_ids``; the caller then
        must not reuse those blocks until ``poll()`` is SUCCESS or FAILED.
        """

    def finish(self) -> None:
        """Declare that every layer was queued; fails the transfer if one is missing."""

    def abort(self, reason: str = "aborted by sender") -> None:
        """Stop the transfer here and on the receiver."""

    def poll(self) -> TransferState:
        """Current state; never blocks."""

    @property
    def error(self) -> str | None:
        """Why the transfer failed, if it did."""


@runtime_checkable
class KVReceiver(Protocol):
    """Decode side of one transfer."""

    ticket: TransferTicket

    def poll(self) -> TransferState:
        """Current state; never blocks."""

    def layers_arrived(self) -> list[int]:
        """Layers written and checksummed so far, in arrival order."""

    @property
    def timings(self) -> TransferTimings | None:
        """Set once SUCCESS."""

    def abort(self, reason: str = "aborted by receiver") -> None:
        """Fail the transfer, free its blocks and tell the sender."""

    @property
    def error(self) -> str | None:
        """Why the transfer failed, if it did."""


class KVEndpoint(Protocol):
    """Receiver-side server of one decode worker; accepts links from many senders."""

    address: str
    epoch: int

    def expect(
        self,
        block_ids: Sequence[int],
        lease_s: float,
        on_done: OnDone | None = None,
        heads: tuple[int, int] | None = None,
        src_rank: int = 0,
    ) -> KVReceiver:
        """Register a transfer into reserved ``block_ids``; its ticket is ``.ticket``.
        ``heads``: only these global KV heads arrive (from prefill rank ``src_rank``), into
        their place in each block (a TP part, kv_transfer/tp_map.py)."""

    def stats(self) -> dict[str, int]:
        """Counters: ``dropped_pages`` / ``dropped_bytes`` (late, stale or malformed pages,
        never written), ``succeeded``, ``failed``, ``refused_pairings`` (handshakes refused:
        layout, backend, secret, deadline, malformed), ``refused_connections`` (sockets
        closed unread: too many pending pairings), ``in_place_pages`` (pages a same-host
        sender wrote straight into the blocks: shm into a shared pool), ``active``."""

    def close(self) -> None:
        """Fail open transfers (freeing their blocks) and stop serving."""


class KVClient(Protocol):
    """Sender-side connector of one prefill worker; one paired link per endpoint."""

    def connect(self, endpoint: str) -> None:
        """Pair with ``endpoint`` now; raises :class:`HandshakeError` on mismatch."""

    def open(self, ticket: TransferTicket, on_done: OnDone | None = None) -> KVSender:
        """Start a transfer for ``ticket`` (pairing first if needed); with a secret, raises
        :class:`TicketRefused` before connecting anywhere unless the ticket is signed."""

    def close(self) -> None:
        """Fail open transfers and close every link."""


@dataclass(frozen=True)
class EndpointArgs:
    """Everything a backend needs to build a receiver endpoint."""

    layout: KVLayout
    spec: KVLayoutSpec
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    free_blocks: FreeBlocks
    epoch: int
    config: TransferConfig
