"""The side channel between a replica's leader and each follower, outside the lockstep.

Steps go over the gloo broadcast (step_sync.py); what does not belong to a step goes
here, at any time and from any thread: the leader asks a follower to expect or open a KV
transfer part and waits for the answer (a request), tells it to abort one (a message),
and a follower reports a transfer part that ended (an event)::

    leader RankHub  ──request {id, kind, body}──────────►  RankLink (follower)
                    ◄──────────────{reply_to: id, body | error}──  handler(body)
                    ──message {kind, body}──────────────►  handler(body)
        on_event(rank, kind, body)  ◄──event {kind, body}──  emit(kind, body)

Each frame is a 4-byte little-endian length and UTF-8 JSON (nothing is pickled). A
follower connects once, at group start, and proves the token the leader broadcast over
the group; a connection without it is closed. A lost connection fails that rank's
pending requests and calls ``on_lost(rank)``.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import itertools
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
MAX_FRAME = 16 << 20
Handler = Callable[[dict[str, Any]], dict[str, Any] | None]


class ChannelError(RuntimeError):
    """A request failed: the follower's handler raised, or the rank is gone."""


def _send(sock: socket.socket, lock: threading.Lock, msg: dict[str, Any]) -> None:
    data = json.dumps(msg).encode()
    with lock:
        sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the channel")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"channel frame of {n} bytes exceeds {MAX_FRAME}")
    return json.loads(_recv_exact(sock, n))


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.lock = sock, threading.Lock()
        self.pending: dict[int, concurrent.futures.Future] = {}


class RankHub:
    """The leader's end: one connection per follower rank."""

    def __init__(self, host: str, size: int, token: str) -> None:
        self.size, self.token = size, token
        self.on_lost: Callable[[int], None] | None = None
        self._handler: Callable[[int, str, dict], None] | None = None
        self._early: list[tuple[int, str, dict]] = []
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._server = socket.create_server((host, 0))
        self.address = f"{host}:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, name="rank-hub", daemon=True).start()

    def wait_connected(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._conns) < self.size - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.size)) - set(self._conns))
                    raise TimeoutError(
                        f"ranks {missing} never joined the channel at {self.address}"
                    )
                self._lock.wait(left)

    def set_event_handler(self, fn: Callable[[int, str, dict], None]) -> None:
        """``fn(rank, kind, body)`` for every follower event (from a reader thread)."""
        with self._lock:
            self._handler, early, self._early = fn, self._early, []
        for event in early:
            fn(*event)

    def request(self, rank: int, kind: str, body: dict, timeout_s: float = 30.0) -> dict:
        """Ask rank ``rank`` and wait for its answer; :class:`ChannelError` if it fails."""
        conn, rid = self._conn(rank), next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        conn.pending[rid] = future
        try:
            _send(conn.sock, conn.lock, {"id": rid, "kind": kind, "body": body})
            return future.result(timeout=timeout_s)
        except (OSError, concurrent.futures.TimeoutError) as exc:
            raise ChannelError(f"rank {rank} did not answer {kind!r}: {exc!r}") from None
        finally:
            conn.pending.pop(rid, None)

    def send(self, rank: int, kind: str, body: dict) -> bool:
        """A one-way message; False if the rank is gone."""
        try:
            conn = self._conn(rank)
            _send(conn.sock, conn.lock, {"kind": kind, "body": body})
            return True
        except (OSError, ChannelError):
            return False

    def close(self) -> None:
        self._server.close()
        for conn in list(self._conns.values()):
            conn.sock.close()

    def _conn(self, rank: int) -> _Conn:
        conn = self._conns.get(rank)
        if conn is None:
            raise ChannelError(f"rank {rank} is not connected to the channel")
        return conn

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(sock,), daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10.0)
            hello = _recv(sock)
            rank = int(hello["rank"])
            if (
                not hmac.compare_digest(str(hello.get("token", "")), self.token)
                or not 0 < rank < self.size
            ):
                raise ConnectionError(f"bad hello from rank {rank}")
            sock.settimeout(None)
        except (OSError, ValueError, KeyError, ConnectionError) as exc:
            logger.warning("channel %s refused a connection: %s", self.address, exc)
            sock.close()
            return
        conn = _Conn(sock)
        with self._lock:
            self._conns[rank] = conn
            self._lock.notify_all()
        self._read(rank, conn)

    def _read(self, rank: int, conn: _Conn) -> None:
        try:
            while True:
                msg = _recv(conn.sock)
                if "reply_to" in msg:
                    self._resolve(rank, conn, msg)
                else:
                    self._event(rank, msg["kind"], msg.get("body", {}))
        except (OSError, ValueError, ConnectionError) as exc:
            self._lost(rank, conn, str(exc))

    def _resolve(self, rank: int, conn: _Conn, msg: dict) -> None:
        future = conn.pending.get(msg["reply_to"])
        if future is None or future.done():
            return
        if "error" in msg:
            future.set_exception(ChannelError(f"rank {rank}: {msg['error']}"))
        else:
            future.set_result(msg.get("body", {}))

    def _event(self, rank: int, kind: str, body: dict) -> None:
        with self._lock:
            handler = self._handler
            if handler is None:
                self._early.append((rank, kind, body))
                return
        try:
            handler(rank, kind, body)
        except Exception:
            logger.exception("channel event %s from rank %d failed", kind, rank)

    def _lost(self, rank: int, conn: _Conn, why: str) -> None:
        with self._lock:
            if self._conns.get(rank) is conn:
                del self._conns[rank]
        for future in list(conn.pending.values()):
            if not future.done():
                future.set_exception(ChannelError(f"rank {rank} left the channel: {why}"))
        conn.sock.close()
        if self.on_lost is not None:
            self.on_lost(rank)


class RankLink:
    """A follower's end: answers the leader's requests, emits events."""

    def __init__(self, address: str, rank: int, token: str) -> None:
        host, _, port = address.rpartition(":")
        self.rank = rank
        self._sock = socket.create_connection((host, int(port)), timeout=30.0)
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._handlers: dict[str, Handler] = {}
        _send(self._sock, self._lock, {"rank": rank, "token": token})

    def serve(self, handlers: dict[str, Handler]) -> None:
        """Start answering the leader (``kind -> handler(body) -> reply``) on a thread."""
        self._handlers = dict(handlers)
        threading.Thread(target=self._read, name=f"rank-link-{self.rank}", daemon=True).start()

    def emit(self, kind: str, body: dict) -> None:
        """An event to the leader (from any thread); dropped if the leader is gone."""
        try:
            _send(self._sock, self._lock, {"kind": kind, "body": body})
        except OSError as exc:
            logger.info("rank %d: channel event %s not sent: %s", self.rank, kind, exc)

    def close(self) -> None:
        self._sock.close()

    def _read(
        self,
    ) -> None:
        try:
            while True:
                self._handle(_recv(self._sock))
        except (OSError, ValueError, ConnectionError) as exc:
            logger.info("rank %d: channel to the leader closed: %s", self.rank, exc)

    def _handle(self, msg: dict) -> None:
        kind, rid = msg.get("kind", ""), msg.get("id")
        try:
            handler = self._handlers[kind]
            reply: dict[str, Any] = {"body": handler(msg.get("body", {})) or {}}
        except Exception as exc:
            logger.exception("rank %d: channel %s failed", self.rank, kind)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if rid is not None:
            try:
                _send(self._sock, self._lock, {"reply_to": rid, **reply})
            except OSError:
                pass
