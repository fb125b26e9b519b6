"""The receiver endpoint of one decode worker: accepts senders, writes their pages.

A transfer passes through the endpoint's tables like this::

    expect()            -> _transfers[id]  (BOOTSTRAPPING, lease running; ticket signed)
    Open on a link      -> bound to that link (WAITING)
    PageDescriptor      -> intake.py: checksum + write into the KV cache at the ticket's
                           block ids (tcp receives straight into the blocks)
                           (TRANSFERRING; SUCCESS once every layer's blocks arrived)
    terminal            -> removed from _transfers; later pages are dropped and counted

A socket passes: accept -> admitted (at most ``max_pending_pairings`` unpaired sockets,
``max_pending_per_host`` per peer address; beyond that closed at once, counted in
``refused_connections``) -> handshake (pairing.py: deadline, 64 KiB frames, the secret
proved) -> paired link. A refused or malformed handshake closes that socket only.

Threads: one acceptor, one reaper (lease expiry), and per admitted socket one thread that
does the handshake, then (paired) reads frames and writes pages.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence

from kv_transfer import auth, tp_map, wire
from kv_transfer.base import EndpointArgs, HandshakeError, OnDone, TransferState, TransferTicket
from kv_transfer.intake import PageIntake
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.pairing import ReceiverSide, receiver_handshake
from kv_transfer.plane import Backend, ReceiverPlane
from kv_transfer.receiver import ReceiverTransfer
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)
_link_ids = itertools.count()
_COUNTERS = (
    "received_pages",
    "received_bytes",
    "dropped_pages",
    "dropped_bytes",
    "succeeded",
    "failed",
    "refused_pairings",
    "refused_connections",
    "in_place_pages",
)


class Endpoint:
    """A ``KVEndpoint`` for any backend; see the module docstring."""

    def __init__(self, backend: Backend, args: EndpointArgs):
        self.backend = backend
        self.args = args
        self.epoch = args.epoch
        self._intake = PageIntake(
            args.layout, args.kv_caches, self._find, self._epoch_problem, self._count_drop,
            lambda pages: self._count("in_place_pages", pages), self._count_received,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._transfers: dict[str, ReceiverTransfer] = {}
        self._links: set[ControlLink] = set()
        self._pending: dict[str, int] = {}  # peer address -> sockets not yet paired
        self._unpaired: set[ControlLink] = set()
        self._counters = dict.fromkeys(_COUNTERS, 0)
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
    def expect(
        self, block_ids: Sequence[int], lease_s: float, on_done: OnDone | None = None,
        heads: tuple[int, int] | None = None, src_rank: int = 0,
    ) -> ReceiverTransfer:  # fmt: skip
        """Register a transfer into the reserved ``block_ids``; hand out ``.ticket``
        (``heads``: a TP part's global KV heads, kv_transfer/tp_map.py)."""
        if self._stop.is_set():
            raise RuntimeError(f"endpoint {self.address} is closed")
        ids, spec = tuple(int(b) for b in block_ids), self.args.spec
        bad = [b for b in ids if not 0 <= b < self.args.layout.num_blocks]
        if bad or len(set(ids)) != len(ids) or not ids:
            raise ValueError(
                f"block_ids must be distinct ids in [0, {self.args.layout.num_blocks}), "
                f"got {list(ids)[:8]}... ({len(ids)} ids, out of range: {bad[:8]})"
            )
        ticket = TransferTicket(
            uuid.uuid4().hex, self.address, ids, self.epoch, time.time() + lease_s,
            self.backend.name, tp_rank=spec.tp_rank, src_rank=src_rank, heads=heads,
        )  # fmt: skip
        ticket = auth.sign_ticket(self.args.config.secret, ticket)
        fence = self._host.fence
        transfer = ReceiverTransfer(
            ticket, self.args.layout.num_layers, self.args.free_blocks, self._on_terminal,
            on_done, fence,
        )  # fmt: skip
        transfer.local_heads = tp_map.local_heads(spec, heads)
        fence.claim(ticket.transfer_id, ids)  # before the ticket leaves: see shm_fence.py
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
            unpaired = list(self._unpaired)
        for link in unpaired:  # their handshake threads end at once
            link.close()
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
        cfg = self.args.config
        while not self._stop.is_set():
            try:
                sock, peer = self._server.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                # e.g. out of file descriptors: keep serving once they are back
                logger.warning("endpoint %s: accept failed: %s", self.address, exc)
                self._stop.wait(0.1)
                continue
            host = str(peer[0])
            if not self._admit(host):
                sock.close()
                continue
            link = ControlLink(sock, f"r{next(_link_ids)}", cfg.heartbeat_s, cfg.peer_timeout_s)
            with self._lock:
                self._unpaired.add(link)
            threading.Thread(
                target=self._pair, args=(link, host), name=f"kv-pair-{link.name}", daemon=True
            ).start()

    def _admit(self, host: str) -> bool:
        """Take a pending-pairing slot for a socket from ``host``; False: refuse it."""
        cfg = self.args.config
        with self._lock:
            total, mine = sum(self._pending.values()), self._pending.get(host, 0)
            if total < cfg.max_pending_pairings and mine < cfg.max_pending_per_host:
                self._pending[host] = mine + 1
                return True
            self._counters["refused_connections"] += 1
            refused = self._counters["refused_connections"]
        if refused == 1 or refused % 1000 == 0:  # a flood must not flood the log as well
            logger.warning(
                "endpoint %s: closed a connection from %s unread: %d sockets are pairing "
                "(%d from that host; limits %d and %d per host); %d refused so far",
                self.address, host, total, mine, cfg.max_pending_pairings,
                cfg.max_pending_per_host, refused,
            )  # fmt: skip
        return False

    def _release(self, link: ControlLink, host: str) -> None:
        with self._lock:
            self._unpaired.discard(link)
            left = self._pending.pop(host) - 1
            if left:
                self._pending[host] = left

    # -- handshake -------------------------------------------------------------------
    def _pair(self, link: ControlLink, host: str) -> None:
        try:
            plane = self._handshake(link, host)
        finally:
            self._release(link, host)
        if plane is None:
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

    def _handshake(self, link: ControlLink, host: str) -> ReceiverPlane | None:
        """Pair, or close this socket only and count why (never the secret)."""
        cfg = self.args.config
        side = ReceiverSide(
            spec=self.args.spec,
            backend=self.backend.name,
            epoch=self.epoch,
            secret=cfg.secret,
            host=self._host,
            paired_frame_limit=wire.paired_frame_limit(self.args.layout.num_blocks),
        )
        try:
            return receiver_handshake(link, side, cfg.handshake_timeout_s)
        except (HandshakeError, PeerLost, TimeoutError, OSError, RuntimeError) as exc:
            # RuntimeError: a backend's pairing step failed (e.g. torch.distributed store).
            logger.warning("endpoint %s refused a sender at %s: %s", self.address, host, exc)
        except Exception:  # a bug here must cost this socket only, never the endpoint
            logger.exception("endpoint %s: pairing with %s crashed", self.address, host)
        with self._lock:
            self._counters["refused_pairings"] += 1
        link.close()
        return None

    # -- frames ----------------------------------------------------------------------
    def _on_frame(self, link: ControlLink, plane: ReceiverPlane, frame: pb.Frame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "pages":
            self._intake.receive(link, plane, frame.pages)
        elif kind == "open":
            self._on_open(link, frame.open)
        elif kind == "abort":
            transfer = self._find(frame.abort.transfer_id)
            if transfer is not None and frame.abort.epoch == self.epoch:
                transfer.fail(f"aborted by sender: {frame.abort.reason}", notify_sender=False)
        elif not plane.on_frame(frame):
            logger.warning("endpoint %s: unexpected %s frame", self.address, kind)

    def _epoch_problem(self, epoch: int, transfer_id: str) -> str | None:
        return None if epoch == self.epoch else self._epoch_error(epoch, transfer_id)

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
        status = pb.Status(transfer_id=msg.transfer_id, state=state, error=wire.clip(error or ""))
        link.try_send(pb.Frame(status=status))

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self._counters[name] += n

    def _count_received(self, pages: int, nbytes: int) -> None:
        with self._lock:
            self._counters["received_pages"] += pages
            self._counters["received_bytes"] += nbytes

    def _count_drop(self, pages: int, nbytes: int) -> None:
        with self._lock:
            self._counters["dropped_pages"] += pages
            self._counters["dropped_bytes"] += nbytes

    def _on_close(self, link: ControlLink, plane: ReceiverPlane, reason: str) -> None:
        with self._lock:
            self._links.discard(link)
            transfers = list(self._transfers.values())
        for transfer in transfers:
            transfer.on_link_lost(link, reason)
        plane.close()
