"""Receiving one PageDescriptor's pages on a link's reader thread (the endpoint's data side).

    descriptor -> sizes fit the layout (of the transfer's heads)?
                  no -> fail that transfer, skip its payload (bounded)
               -> epoch, transfer, link, layer and blocks admitted?  no -> read and drop
               -> checksum + write every chunk into the KV cache -> end_write(checksum ok)
    written in place (shm pool: the sender already wrote the blocks, under the fence)
               -> admitted? no -> drop (nothing to read) -> [checksum the blocks] -> end_write

Whatever is wrong with one descriptor fails (or drops) that transfer only and leaves the
link in sync for the other transfers on it; only a payload that cannot be skipped (larger
than a whole layer of this cache, or undefined for the data path) ends the link.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from engine.kv_cache.layout import KVLayout, head_view
from kv_transfer import messages, wire
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.pages import PageWriter
from kv_transfer.plane import BadDescriptor, ReceiverPlane
from kv_transfer.receiver import ReceiverTransfer
from kv_transfer.wire import byte_view
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


class _Pages:
    """Writers of one slice of the KV heads (all of them, or a TP part's)."""

    def __init__(self, layout: KVLayout, kv_caches, heads: tuple[int, int] | None) -> None:
        a, b = heads or (0, layout.num_kv_heads)
        self.writers = [
            (PageWriter(head_view(k, (a, b))), PageWriter(head_view(v, (a, b))))
            for k, v in kv_caches
        ]
        self.direct_ok = self.writers[0][0].block_views([]) is not None  # contiguous blocks
        self.block_bytes = layout.block_bytes * (b - a) // layout.num_kv_heads


class PageIntake:
    """Writes received pages into the endpoint's KV caches; counts what it drops."""

    def __init__(
        self,
        layout: KVLayout,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        find: Callable[[str], ReceiverTransfer | None],
        epoch_problem: Callable[[int, str], str | None],
        on_drop: Callable[[int, int], None],
        on_in_place: Callable[[int], None] = lambda pages: None,
        on_received: Callable[[int, int], None] = lambda pages, nbytes: None,
    ):
        self._layout, self._kv_caches = layout, kv_caches
        self._pages = {None: _Pages(layout, kv_caches, None)}
        self._num_blocks = layout.num_blocks
        self._max_payload = 2 * layout.num_blocks * layout.block_bytes
        self._find, self._epoch_problem, self._on_drop = find, epoch_problem, on_drop
        self._on_in_place = on_in_place
        self._on_received = on_received
        """Counts the K/V pages and bytes written into blocks (what the transport carried)."""

    def _pages_of(self, transfer: ReceiverTransfer | None) -> _Pages:
        heads = transfer.local_heads if transfer is not None else None
        if heads not in self._pages:  # one reader thread per link: a benign race at worst
            self._pages[heads] = _Pages(self._layout, self._kv_caches, heads)
        return self._pages[heads]

    def receive(self, link: ControlLink, plane: ReceiverPlane, desc: pb.PageDescriptor) -> None:
        transfer = self._find(desc.transfer_id)
        pages = self._pages_of(transfer)
        problem = self._size_problem(desc, pages.block_bytes)
        if problem is not None:
            self._discard(link, plane, desc, problem)
            return
        if desc.written_in_place:
            self._in_place(link, plane, desc)
            return
        plan = wire.desc_plan(desc, pages.block_bytes)
        sizes = [(b - a) * pages.block_bytes for _, a, b in plan]
        why = self._epoch_problem(desc.epoch, desc.transfer_id)
        if why is None:
            why = "unknown or finished transfer" if transfer is None else None
        if why is None:
            why = transfer.begin_write(desc, link)
        targets = None
        if plane.capabilities.run_messages:  # (scratch for a dropped one: the plane's)
            targets = self._targets(desc, plan) if why is None else [None] * len(plan)
        chunks = (
            plane.chunks(desc, sizes) if targets is None else plane.chunks(desc, sizes, targets)
        )
        if why is not None:
            self._drop(plane, desc, chunks, why)
            return
        ok = False
        try:
            if plane.capabilities.direct_recv and pages.direct_ok:
                chunks.close()
                ok = self._receive_direct(transfer, desc, plan, plane, pages)
            else:
                ok = self._receive_chunks(transfer, desc, plan, plane, chunks, targets, pages)
            if ok:  # counted before the layer completes
                self._on_received(2 * len(desc.block_ids), desc.k_bytes + desc.v_bytes)
        except BadDescriptor as exc:
            transfer.fail(f"layer {desc.layer}: {exc}", notify_sender=True)
        except BaseException as exc:
            transfer.fail(f"layer {desc.layer} interrupted: {exc}", notify_sender=False)
            raise
        finally:
            transfer.end_write(desc, ok)

    def _size_problem(self, desc: pb.PageDescriptor, bb: int) -> str | None:
        n = len(desc.block_ids)
        if n > self._num_blocks:
            # Its chunks would be buffered before any block id is checked: refused here,
            # a peer cannot make this endpoint allocate more than one layer of its cache.
            return f"descriptor for layer {desc.layer} names {n} blocks; this cache has {self._num_blocks}"  # fmt: skip
        if n and desc.k_bytes == desc.v_bytes == n * bb:
            return wire.plan_problem(desc)
        return (
            f"descriptor for layer {desc.layer} announces {desc.k_bytes}+{desc.v_bytes} bytes "
            f"for {n} blocks of {bb} bytes (expected {n * bb}+{n * bb})"
        )

    def _discard(
        self, link: ControlLink, plane: ReceiverPlane, desc: pb.PageDescriptor, problem: str
    ) -> None:
        """Fail the transfer (if this link opened it), then skip the payload."""
        total = desc.k_bytes + desc.v_bytes
        if total > self._max_payload:
            raise PeerLost(
                f"{problem}; a payload over {self._max_payload} bytes (every block of a layer "
                "of this cache) cannot be skipped, so the link is closed"
            )
        transfer = self._find(desc.transfer_id)
        if transfer is not None:
            transfer.fail_from(link, problem)
        try:
            plane.discard(desc)
        except wire.FrameError as exc:
            raise PeerLost(f"{problem}; {exc}, so the link is closed") from None
        self._on_drop(2 * len(desc.block_ids), total)
        logger.warning("skipped layer %d of transfer %s: %s", desc.layer, desc.transfer_id, problem)

    def _in_place(self, link: ControlLink, plane: ReceiverPlane, desc: pb.PageDescriptor) -> None:
        """The sender wrote the pages into the blocks itself (shm pool); count the layer."""
        transfer = self._find(desc.transfer_id)
        why = self._epoch_problem(desc.epoch, desc.transfer_id)
        if why is None and transfer is None:
            why = "unknown or finished transfer"
        if why is None and not (plane.capabilities.writes_in_place and plane.in_place_ok()):
            why = "pages written in place by a sender that was not handed the pool"
            transfer.fail_from(link, why)
        if why is None:
            why = transfer.begin_write(desc, link)
        if why is not None:
            logger.info("dropped layer %d of transfer %s: %s", desc.layer, desc.transfer_id, why)
            self._on_drop(2 * len(desc.block_ids), desc.k_bytes + desc.v_bytes)
            return
        ok = False
        try:
            checksum = wire.Checksum(plane.capabilities.checksum)
            if checksum.kind != "none":
                for kv in (0, 1):
                    for view in self._pages[None].writers[desc.layer][kv].checksum_views(desc.block_ids):  # fmt: skip
                        checksum.update(view)
            ok = checksum.value() == _expected_checksum(plane, desc)
            if ok:  # counted before the layer completes
                self._on_received(2 * len(desc.block_ids), desc.k_bytes + desc.v_bytes)
        finally:
            transfer.end_write(desc, ok)
        self._on_in_place(2 * len(desc.block_ids))

    def _receive_chunks(
        self, transfer: ReceiverTransfer, desc: pb.PageDescriptor, plan, plane, chunks, targets, pages
    ) -> bool:  # fmt: skip
        """Checksum and scatter every chunk (while it is hot in cache); a chunk received
        straight into its blocks (``targets``) is only checksummed. True if it matched."""
        checksum = wire.Checksum(plane.capabilities.checksum)
        writers = pages.writers[desc.layer]
        targets = targets or [None] * len(plan)
        for chunk, (kv, a, b), target in zip(chunks, plan, targets, strict=True):
            checksum.update(chunk)
            if target is None and transfer.writable():
                writers[kv].write(desc.block_ids[a:b], chunk)
        return checksum.value() == _expected_checksum(plane, desc)

    def _targets(self, desc: pb.PageDescriptor, plan) -> list[torch.Tensor | None]:
        """Where each message may land straight in the cache: its blocks are consecutive
        (messages.py), in a contiguous cache (never a TP part's slice of the heads)."""
        pages = self._pages_of(self._find(desc.transfer_id))
        writers, ids = pages.writers[desc.layer], desc.block_ids
        out = []
        for kv, a, b in plan:
            cache = writers[kv].cache
            ok = cache.is_contiguous() and messages.consecutive(ids[a:b])
            out.append(messages.run_view(cache, ids[a:b]) if ok else None)
        return out

    def _receive_direct(
        self, transfer: ReceiverTransfer, desc: pb.PageDescriptor, plan, plane, pages
    ) -> bool:
        """Receive each chunk straight into its destination blocks, then checksum them."""
        checksum = wire.Checksum(plane.capabilities.checksum)
        writers = pages.writers[desc.layer]
        for kv, a, b in plan:
            views = writers[kv].block_views(desc.block_ids[a:b]) if transfer.writable() else None
            if views is None:  # failed meanwhile: read the bytes into scratch, never the cache
                views = [byte_view(plane.scratch((b - a) * pages.block_bytes))]
            plane.recv_views(views)
            for view in views:
                checksum.update(view)
        return checksum.value() == _expected_checksum(plane, desc)

    def _drop(self, plane: ReceiverPlane, desc: pb.PageDescriptor, chunks, why: str) -> None:
        try:
            for _ in chunks:
                pass
            _expected_checksum(plane, desc)
        except BadDescriptor as exc:
            why = f"{why}; {exc}"
        logger.info("dropped layer %d of transfer %s: %s", desc.layer, desc.transfer_id, why)
        self._on_drop(2 * len(desc.block_ids), desc.k_bytes + desc.v_bytes)  # K and V


def _expected_checksum(plane: ReceiverPlane, desc: pb.PageDescriptor) -> int:
    """The descriptor's checksum, or the one in the trailer that follows the payload."""
    if not desc.checksum_in_trailer:
        return desc.checksum
    if not plane.capabilities.direct_recv:
        raise PeerLost("a checksum trailer on a backend that streams no inline bytes")
    return plane.trailer(desc)
