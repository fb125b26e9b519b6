"""Prefill-side state of one transfer (the ``KVSender`` the prefill worker drives).

    open()  -> BOOTSTRAPPING (Open sent) -> receiver accepts -> WAITING
            -> send_layer() queues a job  -> TRANSFERRING
            -> the link's writer thread gathers, checksums and sends each layer
            -> receiver's Status(SUCCESS) -> SUCCESS
    any non-terminal state -> FAILED (abort here, receiver's Status(FAILED), dead link)
    SUCCESS or FAILED -> ``on_done(transfer_id, state)``, once

``send_layer`` only queues: the writer thread does the copying, so the compute loop
is never blocked by the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.base import OnDone, TransferState, TransferTicket, report_done
from proto import kv_transfer_pb2 as pb


@dataclass(frozen=True)
class LayerJob:
    """One layer waiting in a link's send queue."""

    transfer: SenderTransfer
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    src_block_ids: torch.Tensor | None
    queued_at: float = field(default_factory=time.monotonic)
    """When ``send_layer`` queued it (``delay_us``: the descriptor's ``sender_delay_us``)."""

    def delay_us(self) -> int:
        return min(int(1e6 * (time.monotonic() - self.queued_at)), (1 << 32) - 1)


@dataclass(frozen=True)
class EndJob:
    """A transfer ended: behind its layers in the send queue, so a plane that writes in
    place lets go of its blocks only after its last write."""

    transfer: SenderTransfer


class SenderTransfer:
    """One outgoing transfer; thread-safe."""

    def __init__(
        self,
        ticket: TransferTicket,
        num_layers: int,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        enqueue: Callable[[LayerJob | None], None],
        send_abort: Callable[[pb.Abort], None],
        on_done: OnDone | None = None,
        on_terminal: Callable[[SenderTransfer], None] | None = None,
    ):
        self.ticket = ticket
        self._on_done = on_done
        self._on_terminal = on_terminal
        self._num_layers = num_layers
        self._page_shape = (len(ticket.block_ids), *block_shape)
        self._block_shape = tuple(block_shape)
        self._dtype = dtype
        self._enqueue = enqueue
        self._send_abort = send_abort
        self._lock = threading.Lock()
        self._accepted = False
        self._queued: set[int] = set()
        self._terminal: TransferState | None = None
        self._error: str | None = None

    # -- KVSender -------------------------------------------------------------------
    def send_layer(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        src_block_ids: Sequence[int] | None = None,
    ) -> None:
        src = self._check_layer(layer, k, v, src_block_ids)
        with self._lock:
            if self._terminal is not None:
                return
            self._queued.add(layer)
        self._enqueue(LayerJob(self, layer, k, v, src))

    def finish(self) -> None:
        missing = sorted(set(range(self._num_layers)) - self._queued)
        if missing and self._terminal is None:
            self.abort(
                f"finish() with {len(missing)} of {self._num_layers} layers never sent "
                f"(first missing: {missing[0]}); call send_layer for every layer"
            )

    def abort(self, reason: str = "aborted by sender") -> None:
        if self.fail(reason):
            t = self.ticket
            self._send_abort(pb.Abort(transfer_id=t.transfer_id, epoch=t.epoch, reason=reason))

    def poll(self) -> TransferState:
        if self._terminal is not None:
            return self._terminal
        if not self._accepted:
            return TransferState.BOOTSTRAPPING
        return TransferState.TRANSFERRING if self._queued else TransferState.WAITING

    @property
    def error(self) -> str | None:
        return self._error

    # -- driven by the client --------------------------------------------------------
    @property
    def live(self) -> bool:
        return self._terminal is None

    def fail(self, reason: str) -> bool:
        """Turn FAILED unless already terminal; True if this call did it."""
        with self._lock:
            if self._terminal is not None:
                return False
            self._terminal, self._error = TransferState.FAILED, reason
        self._done(TransferState.FAILED)
        return True

    def _done(self, state: TransferState) -> None:
        if self._on_terminal is not None:
            self._on_terminal(self)
        report_done(self._on_done, self.ticket.transfer_id, state)

    def on_status(self, status: pb.Status) -> None:
        if status.state == pb.Status.WAITING:
            self._accepted = True
        elif status.state == pb.Status.SUCCESS:
            with self._lock:
                if self._terminal is not None:
                    return
                self._terminal = TransferState.SUCCESS
            self._done(TransferState.SUCCESS)
        elif status.state == pb.Status.FAILED:
            self.fail(f"receiver: {status.error}")

    def _check_layer(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, src: Sequence[int] | None
    ) -> torch.Tensor | None:
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self._num_layers})")
        if layer in self._queued:
            raise ValueError(f"layer {layer} was already sent for {self.ticket.transfer_id}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self._dtype or tuple(t.shape[1:]) != self._block_shape:
                raise ValueError(
                    f"{name} is {t.dtype} {tuple(t.shape)}; the paired layout needs "
                    f"{self._dtype} [*, {', '.join(map(str, self._block_shape))}]"
                )
        if src is None:
            if tuple(k.shape) != self._page_shape or tuple(v.shape) != self._page_shape:
                raise ValueError(
                    f"pages are {tuple(k.shape)}/{tuple(v.shape)}, the ticket needs "
                    f"{self._page_shape}; pass the whole cache with src_block_ids instead"
                )
            return None
        ids = torch.as_tensor(list(src), dtype=torch.int64, device=k.device)
        if ids.numel() != self._page_shape[0]:
            raise ValueError(
                f"{ids.numel()} src_block_ids for a ticket of {self._page_shape[0]} blocks"
            )
        return ids
