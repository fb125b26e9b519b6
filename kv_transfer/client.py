"""The sender-side connector of one prefill worker: one paired link per endpoint.

open(ticket)      -> with a secret, the ticket's signature is checked first
                     (TicketRefused: nothing is connected) -> the link to its endpoint
connect(endpoint) -> Hello [Challenge / Proof] / HelloReply (pairing.py: secret, layout
                     and backend checked, else HandshakeError)
                  -> backend data path connected -> writer thread + reader thread
                  -> (open) Open frame; SenderTransfer registered on that link
send_layer        -> LayerJob on the link's queue -> writer: outgoing.py, as the plane
                     can (in place / straight from the blocks / runs / staged) ->
                     descriptor + bytes
link lost         -> every transfer on it FAILED; the next open() pairs again
new epoch         -> a ticket newer than the link's epoch (the receiver restarted at the
                     same address): the old link is closed, never reused; pair again
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import uuid

from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import auth, outgoing, tp_map, wire
from kv_transfer.base import HandshakeError, OnDone, TransferConfig, TransferTicket
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.pairing import sender_handshake
from kv_transfer.plane import Backend, SenderPlane
from kv_transfer.sender import EndJob, LayerJob, SenderTransfer
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


class _Link:
    """A paired link to one endpoint with its send queue and transfers."""

    def __init__(
        self,
        link: ControlLink,
        plane: SenderPlane,
        epoch: int,
        config: TransferConfig,
        peer: KVLayoutSpec,
    ):
        self.link, self.plane, self.epoch, self.peer = link, plane, epoch, peer
        self._config = config
        self._queue: queue.SimpleQueue[LayerJob | EndJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._transfers: dict[str, SenderTransfer] = {}
        caps = plane.capabilities  # a plane may fix the chunk size at pairing
        self._chunk_bytes = caps.chunk_bytes or config.chunk_bytes or caps.default_chunk_bytes
        self.writer = threading.Thread(
            target=self._write_loop, name=f"kv-w-{link.name}", daemon=True
        )

    def start(self) -> None:
        self.writer.start()
        self.link.start(self._on_frame, self._on_close)

    def add(self, transfer: SenderTransfer) -> None:
        with self._lock:
            self._transfers[transfer.ticket.transfer_id] = transfer

    def enqueue(self, job: LayerJob | EndJob | None) -> None:
        self._queue.put(job)

    def ended(self, transfer: SenderTransfer) -> None:
        if self.plane.capabilities.writes_in_place and outgoing.in_place(transfer.ticket):
            self._queue.put(EndJob(transfer))

    def _on_frame(self, frame: pb.Frame) -> None:
        if frame.HasField("status"):
            with self._lock:
                transfer = self._transfers.get(frame.status.transfer_id)
            if transfer is not None:
                transfer.on_status(frame.status)
                if not transfer.live:
                    self._forget(transfer)
        elif not self.plane.on_frame(frame):
            logger.warning("link %s: unexpected %s frame", self.link.name, frame.WhichOneof("kind"))

    def _forget(self, transfer: SenderTransfer) -> None:
        with self._lock:
            self._transfers.pop(transfer.ticket.transfer_id, None)

    def abort(self, transfer: SenderTransfer, msg: pb.Abort) -> None:
        """Tell the receiver (no reply comes back) and stop tracking the transfer."""
        self._forget(transfer)
        msg.reason = wire.clip(msg.reason)
        self.link.try_send(pb.Frame(abort=msg))

    def _on_close(self, reason: str) -> None:
        with self._lock:
            transfers, self._transfers = list(self._transfers.values()), {}
        for transfer in transfers:
            transfer.fail(f"receiver lost: {reason}")
        self._queue.put(None)

    def _write_loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if isinstance(job, EndJob):
                self.plane.end(job.transfer.ticket.transfer_id)
                continue
            if not job.transfer.live:
                continue
            try:
                self._send(job)
            except PeerLost as exc:
                job.transfer.fail(str(exc))
                self.link.close()
            except Exception as exc:
                logger.exception("link %s: sending layer %d failed", self.link.name, job.layer)
                job.transfer.abort(f"sending layer {job.layer} failed: {exc!r}")
        self.plane.close()

    def _send(self, job: LayerJob) -> None:
        outgoing.send_layer(self.plane, job, self._chunk_bytes)


class Client:
    """A ``KVClient`` for any backend; see the module docstring."""

    def __init__(self, backend: Backend, spec: KVLayoutSpec, config: TransferConfig):
        self.backend, self.spec, self.config = backend, spec, config
        self.sender_id = uuid.uuid4().hex[:8]
        self._dtype = spec.page_dtype  # uint8 for a quantized cache: values + scales
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}

    def connect(self, endpoint: str) -> None:
        self._link_for(endpoint)

    def open(self, ticket: TransferTicket, on_done: OnDone | None = None) -> SenderTransfer:
        auth.check_ticket(self.config.secret, ticket, self.backend.name)  # before connecting
        link = self._link_for(ticket.endpoint, ticket.epoch)
        heads = tp_map.part_heads(ticket, link.peer)
        block_shape = self.spec.page_block_shape(heads[1] - heads[0])
        transfer = SenderTransfer(
            ticket,
            self.spec.num_layers,
            block_shape,
            self._dtype,
            enqueue=link.enqueue,
            send_abort=lambda msg: link.abort(transfer, msg),
            on_done=on_done,
            on_terminal=link.ended,
        )
        problem = tp_map.check_part(self.spec, link.peer, ticket)
        if problem is not None:
            transfer.fail(problem)
            return transfer
        if ticket.epoch != link.epoch:
            transfer.fail(
                f"ticket epoch {ticket.epoch} does not match the receiver's epoch {link.epoch} "
                f"at {ticket.endpoint}; the decode worker restarted, reserve again"
            )
            return transfer
        link.add(transfer)
        if link.plane.capabilities.writes_in_place and outgoing.in_place(
            ticket
        ):  # the fence first (shm_fence.py)
            problem = link.plane.begin(ticket.transfer_id, ticket.block_ids)
            if problem is not None:
                transfer.abort(problem)
                return transfer
        if not link.link.try_send(
            pb.Frame(open=pb.Open(transfer_id=ticket.transfer_id, epoch=ticket.epoch))
        ):
            transfer.fail(f"link to {ticket.endpoint} is closed")
        return transfer

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.link.close()
            link.link.join(timeout=5)
            link.writer.join(timeout=5)

    def _link_for(self, endpoint: str, epoch: int | None = None) -> _Link:
        """The paired link to ``endpoint``; a ticket of a newer ``epoch`` than the link's
        means the receiver restarted at the same address: the old link is closed (its
        transfers fail) and never reused, and a fresh one is paired."""
        stale = None
        with self._lock:
            link = self._links.get(endpoint)
            if link is not None and epoch is not None and epoch > link.epoch:
                stale, link = link, None
            if link is None or link.link.closed:
                link = self._pair(endpoint)
                self._links[endpoint] = link
        if stale is not None:
            logger.info("%s has a new epoch %d (was %d): closing the old link", endpoint, epoch, stale.epoch)  # fmt: skip
            stale.link.close()
        return link

    def _pair(self, endpoint: str) -> _Link:
        host, _, port = endpoint.rpartition(":")
        cfg = self.config
        sock = socket.create_connection((host, int(port)), timeout=cfg.connect_timeout_s)
        link = ControlLink(
            sock, f"s{self.sender_id}->{endpoint}", cfg.heartbeat_s, cfg.peer_timeout_s
        )
        try:
            hello = pb.Hello(
                spec=wire.spec_to_pb(self.spec), backend=self.backend.name, sender_id=self.sender_id
            )
            reply = sender_handshake(link, endpoint, hello, cfg.secret, cfg.connect_timeout_s)
            peer = wire.spec_from_pb(reply.spec)
            try:
                self.spec.check_compatible(peer, ours="prefill", theirs="decode")
                tp_map.check_pairable(self.spec, peer, "prefill", "decode")
            except ValueError as exc:
                raise HandshakeError(str(exc)) from None
            plane = self.backend.connect(link, dict(reply.plane), cfg)
        except BaseException:
            link.close()
            raise
        paired = _Link(link, plane, reply.epoch, cfg, peer)
        paired.start()
        return paired
