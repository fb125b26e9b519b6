"""Decode-side state of one transfer (the ``KVReceiver`` the decode worker polls).

    expect() -> BOOTSTRAPPING -> Open from a sender -> WAITING
             -> first layer written -> TRANSFERRING -> every layer, checksums ok -> SUCCESS
    any non-terminal state -> FAILED (abort, lease expiry, checksum, dead sender)

Blocks are freed exactly once, on FAILED, and only after no chunk is being written
(``_writers == 0``) and the fence revoked them (a writer in another process, shm pool:
shm_fence.py; at once elsewhere), so the engine never reuses a block under an in-flight
write. SUCCESS, too, is declared only once the fence no longer lets a writer touch the
blocks, which then belong to the admitted request and are not freed here. ``on_done``
tells the owner once: after the last layer was written (SUCCESS), after the free (FAILED).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kv_transfer import wire
from kv_transfer.base import (
    FreeBlocks,
    OnDone,
    TransferState,
    TransferTicket,
    TransferTimings,
    report_done,
)
from kv_transfer.link import ControlLink
from kv_transfer.plane import NO_FENCE, Fence
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


class ReceiverTransfer:
    """One expected transfer; thread-safe, all transitions under ``_lock``."""

    def __init__(
        self,
        ticket: TransferTicket,
        num_layers: int,
        free_blocks: FreeBlocks,
        on_terminal: Callable[[ReceiverTransfer], None],
        on_done: OnDone | None = None,
        fence: Fence = NO_FENCE,
    ):
        self.ticket = ticket
        self._fence = fence
        self._on_done = on_done
        self._num_layers = num_layers
        self._free_blocks = free_blocks
        self._on_terminal = on_terminal
        self._lock = threading.Lock()
        self._state = TransferState.BOOTSTRAPPING
        self._error: str | None = None
        self._arrived: list[int] = []
        self._missing: dict[int, set[int]] = {}  # layer -> block ids not yet received
        self._writers = 0
        self._freed = False
        self._link: ControlLink | None = None
        self.local_heads: tuple[int, int] | None = None
        """The slice of this cache's KV heads the pages fill (``None``: all of them)."""
        self._first_at: float | None = None
        self._last = (0.0, 0.0)  # (begin_write time, sender delay) of the latest descriptor
        self.timings: TransferTimings | None = None
        """Set with SUCCESS (``TransferTimings``)."""
        self._deadline = time.monotonic() + max(0.0, ticket.lease_deadline - time.time())

    # -- KVReceiver -------------------------------------------------------------
    def poll(self) -> TransferState:
        return self._state

    def layers_arrived(self) -> list[int]:
        with self._lock:
            return list(self._arrived)

    def abort(self, reason: str = "aborted by receiver") -> None:
        self.fail(reason, notify_sender=True)

    @property
    def error(self) -> str | None:
        return self._error

    # -- driven by the endpoint -------------------------------------------------
    def attach(self, link: ControlLink, epoch: int) -> str | None:
        """A sender opened this transfer; returns why it is refused, if it is."""
        with self._lock:
            if epoch != self.ticket.epoch:
                return f"stale epoch {epoch} for transfer {self.ticket.transfer_id}; receiver epoch is {self.ticket.epoch}"
            if self._state.terminal:
                return f"transfer {self.ticket.transfer_id} is already {self._state.value}: {self._error}"
            if self._link is not None and self._link is not link:
                return f"transfer {self.ticket.transfer_id} was already opened by another sender"
            self._link = link
            if self._state is TransferState.BOOTSTRAPPING:
                self._state = TransferState.WAITING
            return None

    def begin_write(self, desc: pb.PageDescriptor, link: ControlLink) -> str | None:
        """Admit pages of one layer for writing; returns why they must be dropped.

        A descriptor may carry all of the ticket's blocks or any not-yet-received subset
        (the shm backend splits layers to keep its regions cache-sized).
        """
        with self._lock:
            if self._state.terminal:
                return f"transfer is {self._state.value}"
            if link is not self._link:
                return "pages from a link that did not open the transfer"
            if desc.epoch != self.ticket.epoch:
                return f"stale epoch {desc.epoch}, receiver epoch is {self.ticket.epoch}"
            problem = self._pages_problem(desc.layer, desc.block_ids)
            if problem is None:
                self._writers += 1
                now = time.monotonic()
                self._first_at = self._first_at or now
                self._last = (now, desc.sender_delay_us / 1e6)  # one link: in order
                return None
        self.fail(problem, notify_sender=True)
        return problem

    def _pages_problem(self, layer: int, block_ids) -> str | None:
        if not 0 <= layer < self._num_layers:
            return f"layer {layer} out of range [0, {self._num_layers})"
        missing = self._missing.setdefault(layer, set(self.ticket.block_ids))
        extra = [b for b in block_ids if b not in missing]
        if extra or len(set(block_ids)) != len(block_ids):
            return (
                f"layer {layer}: blocks {extra[:8]} are not in the ticket or arrived twice; "
                "the sender must send each ticket block once per layer"
            )
        return None

    def writable(self) -> bool:
        """Whether chunks may still be written (the transfer did not fail meanwhile)."""
        return not self._state.terminal

    def end_write(self, desc: pb.PageDescriptor, checksum_ok: bool) -> None:
        """Finish one descriptor: record its blocks (and the layer once complete), or fail."""
        done = False
        with self._lock:
            self._writers -= 1
            if checksum_ok and not self._state.terminal:
                missing = self._missing[desc.layer]
                missing.difference_update(desc.block_ids)
                done = not missing and len(self._arrived) + 1 == self._num_layers
                if not missing and not done:  # the last one is recorded with SUCCESS
                    self._arrived.append(desc.layer)
                self._state = TransferState.TRANSFERRING
        if not checksum_ok:
            self.fail(f"checksum mismatch on layer {desc.layer}: pages corrupted in transit", True)
        elif done:
            succeed = lambda: self._succeed(desc.layer)  # noqa: E731
            self._fence.revoke(self.ticket.transfer_id, self.ticket.block_ids, succeed)
        self._maybe_free()

    def _succeed(self, last_layer: int) -> None:
        """Every layer arrived and no writer can touch the blocks any more."""
        with self._lock:
            if self._state.terminal:  # failed meanwhile (abort during the revoke)
                return
            self._arrived.append(last_layer)
            self._state = TransferState.SUCCESS
            now, (began, delay) = time.monotonic(), self._last
            self.timings = TransferTimings(now - (self._first_at or now), delay + now - began)
        self._notify(pb.Status.SUCCESS, "")
        self._on_terminal(self)
        self._done(TransferState.SUCCESS)

    def expire_if_due(self, now: float) -> None:
        if not self._state.terminal and now >= self._deadline:
            lease = self.ticket.lease_deadline
            self.fail(
                f"lease expired (deadline {lease:.3f}, {len(self._arrived)}/{self._num_layers} "
                "layers arrived); raise the lease or check the prefill worker",
                notify_sender=True,
            )

    def fail(self, reason: str, notify_sender: bool) -> None:
        with self._lock:
            if self._state.terminal:
                return
            self._state = TransferState.FAILED
            self._error = reason
        logger.info("transfer %s failed: %s", self.ticket.transfer_id, reason)
        if notify_sender:
            self._notify(pb.Status.FAILED, reason)
        self._on_terminal(self)
        self._maybe_free()

    def on_link_lost(self, link: ControlLink, reason: str) -> None:
        if self._link is link:
            self.fail(f"sender lost: {reason}", notify_sender=False)

    def fail_from(self, link: ControlLink, reason: str) -> None:
        """A frame on ``link`` was bad: fail only if that link opened this transfer, so a
        peer cannot fail the transfers of another."""
        if self._link is link:
            self.fail(reason, notify_sender=True)

    def _maybe_free(self) -> None:
        with self._lock:
            if self._state is not TransferState.FAILED or self._writers or self._freed:
                return
            self._freed = True
        self._fence.revoke(self.ticket.transfer_id, self.ticket.block_ids, self._release)

    def _release(self) -> None:
        self._free_blocks(list(self.ticket.block_ids))
        self._done(TransferState.FAILED)

    def _done(self, state: TransferState) -> None:
        report_done(self._on_done, self.ticket.transfer_id, state)

    def _notify(self, state: int, error: str) -> None:
        link = self._link
        if link is not None:
            status = pb.Status(
                transfer_id=self.ticket.transfer_id, state=state, error=wire.clip(error)
            )
            link.try_send(pb.Frame(status=status))
