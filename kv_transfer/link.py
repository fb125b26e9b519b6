"""One control link between a sender-side client and a receiver endpoint.

Life of a link::

    connect/accept -> handshake (Hello / HelloReply, synchronous)
        -> running (reader thread: frame -> on_frame, heartbeats when idle)
        -> closed (EOF, peer silent for peer_timeout_s, or close()) -> on_close(reason)

Writes are serialised by a lock, so any thread may send. The reader thread is the only
reader; backends that stream page bytes inline read them from inside ``on_frame``.

A frame longer than ``max_frame_bytes`` (64 KiB until the owner raises it after pairing)
or that does not parse ends the link (``PeerLost``) before anything of that size is
allocated. The handshake reads with a ``deadline``: a peer that trickles bytes is cut
off when it passes, whatever it still sends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from kv_transfer import wire
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)
_IOV_MAX = 512
"""Buffers per sendmsg/recvmsg_into call (Linux allows 1024)."""


class PeerLost(ConnectionError):
    """The peer closed the link or stayed silent past the timeout."""


class ControlLink:
    """Framed, heartbeated protobuf link over a connected socket."""

    def __init__(self, sock: socket.socket, name: str, heartbeat_s: float, peer_timeout_s: float):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(heartbeat_s)
        self.sock = sock
        self.name = name
        self._heartbeat_s = heartbeat_s
        self._peer_timeout_s = peer_timeout_s
        self._wlock = threading.Lock()
        self._last_recv = self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._prefix = bytearray(4)
        self._thread: threading.Thread | None = None
        self.max_frame_bytes = wire.HANDSHAKE_MAX_FRAME_BYTES
        """Longest frame accepted; raised by the receiver once the peer is paired."""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, frame: pb.Frame, payload: Sequence[memoryview] = ()) -> None:
        """Send one frame, then the ``payload`` buffers (inline page bytes), atomically."""
        with self.writing() as write:
            write([memoryview(wire.encode_frame(frame)), *payload])

    @contextlib.contextmanager
    def writing(self) -> Iterator[Callable[[list[memoryview]], None]]:
        """Hold the write lock; yields ``write(buffers)`` for a multi-part message."""
        with self._wlock:
            if self.closed:
                raise PeerLost(f"link {self.name} is closed")
            try:
                yield self._sendmsg
            except OSError as exc:
                raise PeerLost(f"link {self.name}: send failed: {exc}") from exc
            self._last_sent = time.monotonic()

    def _sendmsg(self, views: list[memoryview]) -> None:
        # Scatter-gather send: page bytes go from their blocks to the socket with no copy.
        i = 0
        while i < len(views):
            sent = self.sock.sendmsg(views[i : i + _IOV_MAX])
            i = _advance(views, i, sent)

    def try_send(self, frame: pb.Frame) -> bool:
        """Send if the link is up; report instead of raising."""
        try:
            self.send(frame)
            return True
        except PeerLost:
            return False

    def recv_into(self, buf: memoryview, deadline: float | None = None) -> None:
        """Fill ``buf`` exactly, sending heartbeats and enforcing the peer timeout (and
        ``deadline``, a ``time.monotonic()`` value, when given)."""
        got = 0
        while got < len(buf):
            if deadline is not None and time.monotonic() > deadline:
                raise PeerLost(f"link {self.name}: the peer did not complete the handshake in time")
            try:
                n = self.sock.recv_into(buf[got:])
            except TimeoutError:
                self._idle_tick()
                continue
            except OSError as exc:
                raise PeerLost(f"link {self.name}: {exc}") from exc
            if n == 0:
                raise PeerLost(f"link {self.name}: peer closed the connection")
            got += n
            self._last_recv = time.monotonic()

    def recv_frame(self, deadline: float | None = None) -> pb.Frame:
        """Read the next frame (heartbeats included); see ``recv_into`` for ``deadline``."""
        self.recv_into(memoryview(self._prefix), deadline)
        try:
            body = bytearray(wire.frame_length(self._prefix, self.max_frame_bytes))
            self.recv_into(memoryview(body), deadline)
            return wire.decode_frame(body)
        except wire.FrameError as exc:
            raise PeerLost(f"link {self.name}: {exc}") from None

    def recv_into_views(self, views: list[memoryview]) -> None:
        """Fill every buffer in ``views`` exactly, in order (scatter receive, no copy)."""
        views, i = list(views), 0
        while i < len(views):
            try:
                n = self.sock.recvmsg_into(views[i : i + _IOV_MAX])[0]
            except TimeoutError:
                self._idle_tick()
                continue
            except OSError as exc:
                raise PeerLost(f"link {self.name}: {exc}") from exc
            if n == 0:
                raise PeerLost(f"link {self.name}: peer closed the connection")
            self._last_recv = time.monotonic()
            i = _advance(views, i, n)

    def _idle_tick(self) -> None:
        if self.closed:
            raise PeerLost(f"link {self.name} is closed")
        now = time.monotonic()
        if now - self._last_recv > self._peer_timeout_s:
            raise PeerLost(
                f"link {self.name}: no frame from the peer for {now - self._last_recv:.1f}s "
                f"(peer_timeout_s={self._peer_timeout_s})"
            )
        if now - self._last_sent >= self._heartbeat_s:
            self.try_send(pb.Frame(heartbeat=pb.Heartbeat()))

    def start(self, on_frame: Callable[[pb.Frame], None], on_close: Callable[[str], None]) -> None:
        """Run the reader thread until the link dies; ``on_close`` gets the reason once."""

        def loop() -> None:
            reason = "closed"
            try:
                while True:
                    frame = self.recv_frame()
                    if not frame.HasField("heartbeat"):
                        on_frame(frame)
            except PeerLost as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not leave the peer hanging
                logger.exception("link %s: reader crashed", self.name)
                reason = f"link {self.name}: reader crashed: {exc!r}"
            self.close()
            on_close(reason)

        self._thread = threading.Thread(target=loop, name=f"kv-link-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        started = thread is not None and thread.ident is not None
        if started and thread is not threading.current_thread():
            thread.join(timeout)


def _advance(views: list[memoryview], i: int, nbytes: int) -> int:
    """Consume ``nbytes`` from ``views[i:]``; returns the first unfinished index."""
    while nbytes and i < len(views):
        size = views[i].nbytes
        if nbytes >= size:
            nbytes -= size
            i += 1
        else:
            views[i] = views[i][nbytes:]
            nbytes = 0
    while i < len(views) and views[i].nbytes == 0:
        i += 1
    return i
