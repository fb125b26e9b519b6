"""The shm backend's zero-copy mode: a prefill worker on the same host copies each layer
straight into the decode worker's shared KV pool (engine/kv_cache/shared_pool.py), one
copy per byte, and the descriptor only says the layer is there.

Pairing, after the control-link handshake proved both sides::

    receiver  HelloReply: pool_socket (an abstract unix socket), a one-time pool_token,
              the pool's layout (and on CUDA its IPC handle)
    sender    connect, send the token -> the memfd arrives by SCM_RIGHTS (only for a
              process of this user: SO_PEERCRED) -> its own open of it (/proc/self/fd:
              its own fence locks) -> mapped, populated
              (a sender that cannot -- another host or network namespace -- uses regions)

Per transfer (the fence: shm_fence.py)::

    open      acquire the ticket's blocks (locked, and still this transfer's) or refuse
    layer     copy K and V: source blocks -> the ticket's blocks (one memcpy per run of
              consecutive ids) -> PageDescriptor(written_in_place) -> the receiver counts
              the layer (after checking the blocks, if the pairing set a checksum)
    the last layer written, or the transfer ended -> release the blocks
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Mapping

import numpy as np
import torch

from engine.kv_cache.layout import KVLayout, copy_blocks, dtype_from_name, dtype_name
from engine.kv_cache.shared_pool import SharedKVPool
from kv_transfer import wire
from kv_transfer.backends.shm_fence import PoolFence
from kv_transfer.link import ControlLink
from kv_transfer.pages import PageWriter
from kv_transfer.sender import LayerJob
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)
_TOKEN_CHARS = 32
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def layout_param(layout: KVLayout) -> str:
    lay = layout
    parts = (lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim, lay.num_layers)
    return ",".join(map(str, (*parts, dtype_name(lay.dtype), lay.kv_cache_dtype)))


def layout_from_param(text: str) -> KVLayout:
    blocks, size, heads, dim, layers, dtype, kv_dtype = text.split(",")
    return KVLayout(int(layers), int(blocks), int(size), int(heads), int(dim), dtype_from_name(dtype), kv_dtype)  # fmt: skip


class PoolGrants:
    """Receiver side: hands the pool's memfd to the senders this endpoint paired with."""

    def __init__(self, pool: SharedKVPool, timeout_s: float):
        self.pool, self._timeout = pool, timeout_s
        self.name = f"pdserve-kv-{uuid.uuid4().hex}"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind("\0" + self.name)  # abstract: no file to leak
        self._server.listen(16)
        self._lock = threading.Lock()
        self._offers: dict[str, Callable[[], None]] = {}
        threading.Thread(target=self._accept_loop, name="kv-shm-pool", daemon=True).start()

    def params(self, token: str) -> dict[str, str]:
        pool = self.pool
        return {"pool_socket": self.name, "pool_token": token,
                "pool_layout": layout_param(pool.geometry.layout), **pool.export_cuda()}  # fmt: skip

    def offer(self, on_grant: Callable[[], None]) -> str:
        """A one-time token; ``on_grant`` runs before its redeemer gets the descriptor."""
        token = uuid.uuid4().hex
        with self._lock:
            self._offers[token] = on_grant
        return token

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._offers.pop(token, None)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._grant, args=(conn,), daemon=True).start()

    def _grant(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self._timeout)
                token = _recv_exactly(conn, _TOKEN_CHARS).decode("ascii", "replace")
                _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))  # fmt: skip
                with self._lock:
                    on_grant = self._offers.pop(token, None) if uid == os.getuid() else None
                if on_grant is None:
                    logger.warning("shm pool: refused a connection (uid %d) without a valid token", uid)  # fmt: skip
                    return
                on_grant()
                socket.send_fds(conn, [b"ok"], [self.pool.fd])
            except OSError as exc:
                logger.warning("shm pool: handing out the pool failed: %s", exc)

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("peer closed before sending its token")
        data += chunk
    return data


def fetch_pool(params: Mapping[str, str], timeout_s: float) -> SharedKVPool:
    """Sender side: redeem the token for the memfd and map the pool; OSError if refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect("\0" + params["pool_socket"])
        s.sendall(params["pool_token"].encode("ascii"))
        msg, fds, _, _ = socket.recv_fds(s, 16, 1)
    if msg != b"ok" or not fds:
        raise OSError("the decode worker did not hand out its KV pool")
    try:  # an open file description of our own: the fence's locks are per description
        fd = os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR | os.O_CLOEXEC)
    finally:
        os.close(fds[0])
    cuda = {k: v for k, v in params.items() if k.startswith("cuda_")}
    try:
        return SharedKVPool.attach(fd, layout_from_param(params["pool_layout"]), cuda or None)
    except BaseException:
        os.close(fd)
        raise


class PoolWriter:
    """Sender side: writes layers into the pool under the fence; one per paired link, used
    by its writer thread (``begin`` by the caller of ``open``)."""

    def __init__(self, link: ControlLink, pool: SharedKVPool, checksum: str):
        self._link, self.pool, self._checksum = link, pool, checksum
        self._fence = PoolFence(pool.fd, pool.owners)
        self._lock = threading.Lock()
        self._held: dict[str, tuple[tuple[int, ...], set[int]]] = {}
        """transfer id -> (its blocks, layers written) while it holds the fence."""

    def begin(self, transfer_id: str, block_ids: tuple[int, ...]) -> str | None:
        if not self._fence.acquire(transfer_id, block_ids):
            return (
                f"transfer {transfer_id}'s blocks are no longer its own in the decode worker's "
                "pool (lease expired or aborted); reserve again"
            )
        with self._lock:
            self._held[transfer_id] = (block_ids, set())
        return None

    def write_layer(self, desc: pb.PageDescriptor, job: LayerJob) -> None:
        """Copy the layer into the ticket's blocks (if still held), then the descriptor."""
        tid = desc.transfer_id
        with self._lock:
            held = self._held.get(tid)
        desc.written_in_place = True
        if held is not None:  # else the transfer ended: the receiver drops the descriptor
            blocks, done = held
            desc.checksum = self._copy(job, blocks)
            done.add(job.layer)
            if len(done) == len(self.pool.caches):
                self.end(tid)  # before the last descriptor: the receiver reclaims at once
        desc.sender_delay_us = job.delay_us()  # the copy included
        self._link.send(pb.Frame(pages=desc))

    def _copy(self, job: LayerJob, blocks: tuple[int, ...]) -> int:
        src = job.src_block_ids.cpu().numpy() if job.src_block_ids is not None else np.arange(len(blocks))  # fmt: skip
        checksum = wire.Checksum(self._checksum)
        for dst, source in zip(self.pool.caches[job.layer], (job.k, job.v), strict=True):
            copy_blocks(dst, blocks, source, src)
            if checksum.kind != "none":
                for view in PageWriter(dst).checksum_views(blocks):
                    checksum.update(view)
        if job.k.is_cuda:
            torch.cuda.current_stream(job.k.device).synchronize()  # written before it is said
        return checksum.value()

    def end(self, transfer_id: str) -> None:
        """Let go of the transfer's blocks (the writer thread, after its last write)."""
        with self._lock:
            held = self._held.pop(transfer_id, None)
        if held is not None:
            self._fence.release(held[0])

    def close(self) -> None:
        with self._lock:
            self._held.clear()
        self.pool.close()  # closing our description drops every lock it still holds
