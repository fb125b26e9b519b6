"""One control link between a sender-side client and a receiver endpoint.

Life of a link::

    connect/accept -> handshake (Hello / HelloReply, synchronous)
        -> running (reader thread: frame -> on_frame, heartbeats when idle)
        -> closed (EOF, peer silent for peer_timeout_s, or close()) -> on_close(reason)

Writes are serialised by a lock, so any thread may send. The reader thread is the only
reader; backends that stream page bytes inline read them from inside ``on_frame``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from kv_transfer import wire
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


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

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, frame: pb.Frame, payload: memoryview | None = None) -> None:
        """Send one frame (and optional inline payload bytes) atomically."""
        data = wire.encode_frame(frame)
        with self._wlock:
            if self.closed:
                raise PeerLost(f"link {self.name} is closed")
            try:
                self.sock.sendall(data)
                if payload is not None and payload.nbytes:
                    self.sock.sendall(payload)
            except OSError as exc:
                raise PeerLost(f"link {self.name}: send failed: {exc}") from exc
            self._last_sent = time.monotonic()

    def try_send(self, frame: pb.Frame) -> bool:
        """Send if the link is up; report instead of raising."""
        try:
            self.send(frame)
            return True
        except PeerLost:
            return False

    def recv_into(self, buf: memoryview) -> None:
        """Fill ``buf`` exactly, sending heartbeats and enforcing the peer timeout."""
        got = 0
        while got < len(buf):
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

    def recv_frame(self) -> pb.Frame:
        """Read the next frame (heartbeats included)."""
        self.recv_into(memoryview(self._prefix))
        body = bytearray(wire.frame_length(self._prefix))
        self.recv_into(memoryview(body))
        return wire.decode_frame(body)

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
