"""The receiver endpoint of one decode worker: accepts senders, writes their pages.

A transfer passes through the endpoint's tables like this::

    expect()            -> _transfers[id]  (BOOTSTRAPPING, lease running)
    Open on a link      -> bound to that link (WAITING)
    PageDescriptor      -> chunks: checksum + write into the KV cache at the ticket's
                           block ids (pages.py; tcp receives straight into the blocks)
                           (TRANSFERRING; SUCCESS once every layer's blocks arrived)
    terminal            -> removed from _transfers; later pages are dropped and counted

Threads: one acceptor, one reaper (lease expiry), and per link one reader that does the
handshake, then reads frames and writes pages.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence

from kv_transfer import wire
from kv_transfer.base import EndpointArgs, HandshakeError, TransferState, TransferTicket
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.pages import PageWriter
from kv_transfer.plane import Backend, ReceiverPlane
from kv_transfer.receiver import ReceiverTransfer
from kv_transfer.wire import byte_view
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)
_link_ids = itertools.count()


class Endpoint:
    """A ``KVEndpoint`` for any backend; see the module docstring."""

    def __init__(self, backend: Backend, args: EndpointArgs):
        self.backend = backend
        self.args = args
        self.epoch = args.epoch
        self._writers = [(PageWriter(k), PageWriter(v)) for k, v in args.kv_caches]
        self._direct_ok = self._writers[0][0].block_views([]) is not None
        self._block_bytes = args.layout.block_bytes
        self._lock = threading.Lock()
        self._transfers: dict[str, ReceiverTransfer] = {}
        self._links: set[ControlLink] = set()
        self._counters = dict.fromkeys(
            ("dropped_pages", "dropped_bytes", "succeeded", "failed", "refused_pairings"), 0
        )
        self._stop = threading.Event()
        self._host = backend.host(args)
        self._server = socket.create_server((args.config.host, 0))
        self.address = f"{args.config.host}:{self._server.getsockname()[1]}"
        self._threads = [
            threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True),
            threading.Thread(target=self._reap_loop, name="kv-reaper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- KVEndpoint --------------------------------------------------------------
    def expect(self, block_ids: Sequence[int], lease_s: float) -> ReceiverTransfer:
        """Register a transfer into the reserved ``block_ids``; hand out ``.ticket``."""
        if self._stop.is_set():
            raise RuntimeError(f"endpoint {self.address} is closed")
        ids = tuple(int(b) for b in block_ids)
        bad = [b for b in ids if not 0 <= b < self.args.layout.num_blocks]
        if bad or len(set(ids)) != len(ids) or not ids:
            raise ValueError(
                f"block_ids must be distinct ids in [0, {self.args.layout.num_blocks}), "
                f"got {list(ids)[:8]}... ({len(ids)} ids, out of range: {bad[:8]})"
            )
        ticket = TransferTicket(
            transfer_id=uuid.uuid4().hex,
            endpoint=self.address,
            block_ids=ids,
            epoch=self.epoch,
            lease_deadline=time.time() + lease_s,
        )
        transfer = ReceiverTransfer(
            ticket, self.args.layout.num_layers, self.args.free_blocks, self._on_terminal
        )
        with self._lock:
            self._transfers[ticket.transfer_id] = transfer
        return transfer

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counters, "active": len(self._transfers)}

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._server.close()
        with self._lock:
            transfers, links = list(self._transfers.values()), list(self._links)
        for transfer in transfers:
            transfer.fail(f"receiver endpoint {self.address} closed", notify_sender=True)
        for link in links:
            link.close()
        for link in links:
            link.join(timeout=5)
        self._host.close()

    # -- bookkeeping ---------------------------------------------------------------
    def _on_terminal(self, transfer: ReceiverTransfer) -> None:
        key = "succeeded" if transfer.poll() is TransferState.SUCCESS else "failed"
        with self._lock:
            self._transfers.pop(transfer.ticket.transfer_id, None)
            self._counters[key] += 1

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.args.config.reap_interval_s):
            with self._lock:
                transfers = list(self._transfers.values())
            now = time.monotonic()
            for transfer in transfers:
                transfer.expire_if_due(now)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            cfg = self.args.config
            link = ControlLink(sock, f"r{next(_link_ids)}", cfg.heartbeat_s, cfg.peer_timeout_s)
            threading.Thread(target=self._pair, args=(link,), daemon=True).start()

    # -- handshake -------------------------------------------------------------------
    def _pair(self, link: ControlLink) -> None:
        try:
            plane = self._handshake(link)
        except (HandshakeError, PeerLost, TimeoutError, OSError, RuntimeError) as exc:
            # RuntimeError: a backend's pairing step failed (e.g. torch.distributed store).
            logger.warning("endpoint %s refused a sender: %s", self.address, exc)
            with self._lock:
                self._counters["refused_pairings"] += 1
            link.close()
            return
        with self._lock:
            if self._stop.is_set():
                link.close()
                plane.close()
                return
            self._links.add(link)
        link.start(
            lambda f: self._on_frame(link, plane, f), lambda r: self._on_close(link, plane, r)
        )

    def _handshake(self, link: ControlLink) -> ReceiverPlane:
        frame = link.recv_frame()
        if not frame.HasField("hello"):
            raise HandshakeError(f"expected Hello, got {frame.WhichOneof('kind')}")
        hello = frame.hello
        reply = pb.HelloReply(spec=wire.spec_to_pb(self.args.spec), epoch=self.epoch)
        try:
            self._check_hello(hello)
        except HandshakeError as exc:
            reply.ok, reply.error = False, str(exc)
            link.try_send(pb.Frame(hello_reply=reply))
            raise
        params, finish = self._host.accept(link, hello)
        reply.ok = True
        reply.plane.update(params)
        link.send(pb.Frame(hello_reply=reply))
        return finish()

    def _check_hello(self, hello: pb.Hello) -> None:
        if hello.backend != self.backend.name:
            raise HandshakeError(
                f"backend mismatch: prefill={hello.backend}, decode={self.backend.name}; "
                "start both workers with the same --kv-transport"
            )
        theirs = wire.spec_from_pb(hello.spec)
        try:
            self.args.spec.check_compatible(theirs, ours="decode", theirs="prefill")
        except ValueError as exc:
            raise HandshakeError(str(exc)) from None

    # -- frames ----------------------------------------------------------------------
    def _on_frame(self, link: ControlLink, plane: ReceiverPlane, frame: pb.Frame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "pages":
            self._on_pages(link, plane, frame.pages)
        elif kind == "open":
            self._on_open(link, frame.open)
        elif kind == "abort":
            transfer = self._find(frame.abort.transfer_id)
            if transfer is not None and frame.abort.epoch == self.epoch:
                transfer.fail(f"aborted by sender: {frame.abort.reason}", notify_sender=False)
        elif not plane.on_frame(frame):
            logger.warning("endpoint %s: unexpected %s frame", self.address, kind)

    def _epoch_error(self, epoch: int, transfer_id: str) -> str:
        return (
            f"transfer {transfer_id} carries epoch {epoch}, which is not this endpoint's "
            f"epoch {self.epoch} at {self.address}; the ticket belongs to another incarnation "
            "of the decode worker: reserve again"
        )

    def _find(self, transfer_id: str) -> ReceiverTransfer | None:
        with self._lock:
            return self._transfers.get(transfer_id)

    def _on_open(self, link: ControlLink, msg: pb.Open) -> None:
        transfer = self._find(msg.transfer_id)
        if msg.epoch != self.epoch:
            error = self._epoch_error(msg.epoch, msg.transfer_id)
        elif transfer is None:
            error = f"unknown or finished transfer {msg.transfer_id} on {self.address}"
        else:
            error = transfer.attach(link, msg.epoch)
        state = pb.Status.FAILED if error else pb.Status.WAITING
        status = pb.Status(transfer_id=msg.transfer_id, state=state, error=error or "")
        link.try_send(pb.Frame(status=status))

    def _on_pages(self, link: ControlLink, plane: ReceiverPlane, desc: pb.PageDescriptor) -> None:
        n = len(desc.block_ids)
        if desc.k_bytes != n * self._block_bytes or desc.v_bytes != desc.k_bytes:
            raise PeerLost(
                f"descriptor for layer {desc.layer} carries {desc.k_bytes}+{desc.v_bytes} bytes "
                f"for {n} blocks of {self._block_bytes} bytes; the stream cannot be resynced"
            )
        plan = wire.layer_plan(n, self._block_bytes, desc.chunk_bytes)
        chunks = plane.chunks(desc, [(b - a) * self._block_bytes for _, a, b in plan])
        transfer = self._find(desc.transfer_id)
        if desc.epoch != self.epoch:
            self._drop(plane, desc, chunks, self._epoch_error(desc.epoch, desc.transfer_id))
            return
        if transfer is None:
            self._drop(plane, desc, chunks, "unknown or finished transfer")
            return
        why = transfer.begin_write(desc, link)
        if why is not None:
            self._drop(plane, desc, chunks, why)
            return
        ok = False
        try:
            if getattr(plane, "direct", False) and self._direct_ok:
                chunks.close()
                ok = self._receive_layer_direct(transfer, desc, plan, plane)
            else:
                ok = self._receive_layer(transfer, desc, plan, plane, chunks)
        except BaseException as exc:
            transfer.fail(f"layer {desc.layer} interrupted: {exc}", notify_sender=False)
            raise
        finally:
            transfer.end_write(desc, ok)

    def _receive_layer(
        self, transfer: ReceiverTransfer, desc: pb.PageDescriptor, plan, plane, chunks
    ) -> bool:
        """Checksum and scatter every chunk (while it is hot in cache); True if it matched."""
        checksum = wire.Checksum()
        writers = self._writers[desc.layer]
        for chunk, (kv, a, b) in zip(chunks, plan, strict=True):
            checksum.update(chunk)
            if transfer.writable():
                writers[kv].write(desc.block_ids[a:b], chunk)
        return checksum.value() == _expected_checksum(plane, desc)

    def _receive_layer_direct(
        self, transfer: ReceiverTransfer, desc: pb.PageDescriptor, plan, plane
    ) -> bool:
        """Receive each chunk straight into its destination blocks, then checksum them."""
        checksum = wire.Checksum()
        writers = self._writers[desc.layer]
        for kv, a, b in plan:
            views = writers[kv].block_views(desc.block_ids[a:b]) if transfer.writable() else None
            if views is None:  # failed meanwhile: read the bytes into scratch, never the cache
                views = [byte_view(plane.scratch((b - a) * self._block_bytes))]
            plane.recv_views(views)
            for view in views:
                checksum.update(view)
        return checksum.value() == _expected_checksum(plane, desc)

    def _drop(self, plane: ReceiverPlane, desc: pb.PageDescriptor, chunks, why: str) -> None:
        for _ in chunks:
            pass
        _expected_checksum(plane, desc)
        logger.info("dropped layer %d of transfer %s: %s", desc.layer, desc.transfer_id, why)
        with self._lock:
            self._counters["dropped_pages"] += 2 * len(desc.block_ids)  # K and V
            self._counters["dropped_bytes"] += desc.k_bytes + desc.v_bytes

    def _on_close(self, link: ControlLink, plane: ReceiverPlane, reason: str) -> None:
        with self._lock:
            self._links.discard(link)
            transfers = list(self._transfers.values())
        for transfer in transfers:
            transfer.on_link_lost(link, reason)
        plane.close()


def _expected_checksum(plane: ReceiverPlane, desc: pb.PageDescriptor) -> int:
    """The descriptor's checksum, or the one in the trailer that follows the payload."""
    return plane.trailer(desc) if desc.checksum_in_trailer else desc.checksum
