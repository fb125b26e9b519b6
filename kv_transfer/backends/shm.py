"""shm: page bytes move within one host, without a socket.

Two data paths, chosen at pairing:

- **in place** (zero copy, shm_pool.py): the decode worker's KV pool is in shared memory
  (engine/kv_cache/shared_pool.py); the sender copies each layer straight into the
  reserved blocks under the fence of shm_fence.py, and the descriptor only says so;
- **regions** (below): the receiver's cache is private, or the sender could not map the
  pool; each layer is gathered into a shared region and scattered out of it (two copies).

Integrity: no checksum by default on either path (``Capabilities.checksum == "none"``):
the bytes never leave this host's memory, the region protocol (Release) and the fence
decide who may touch which bytes, and a layer counts only once its writer said it is
complete. The plane option ``checksum`` (``xxh3`` / ``crc32c``) turns one on.

A region's life::

    sender creates /dev/shm/pdserve-kv-* (free) -> staging(): gather + checksum into it
      -> descriptor names it (busy) -> receiver maps it (and unlinks the name at once,
      so a crash leaks nothing) -> checksum + scatter straight from the mapping
      -> Release(name) -> free again
    too small for a layer -> sender retires it (Release to the receiver: unmap)
    a descriptor the receiver cannot read (bad name, overrun, sizes that do not fit the
      layout) -> Release at once, unread: that transfer fails, the link stays up

The sender keeps at most ``shm_regions`` regions (plane option, default 3), so layer
i+1 is gathered while the receiver still writes layer i. A layer larger than
``shm_region_bytes`` (default 16 MiB) goes as several descriptors, each for a slice of
the ticket's blocks. (Smaller regions that stay in the last-level cache were measured
slower here: each descriptor/Release round trip costs more than the cache saves.)
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from engine.kv_cache.shared_pool import find_pool
from kv_transfer.backends.shm_fence import PoolFence
from kv_transfer.backends.shm_pool import PoolGrants, PoolWriter, fetch_pool
from kv_transfer.base import EndpointArgs, TransferConfig
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.plane import (
    NO_FENCE,
    Backend,
    BadDescriptor,
    Capabilities,
    ReceiverPlane,
    checksum_kind,
)
from kv_transfer.sender import LayerJob
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class _Region:
    def __init__(self, path: str, size: int, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name, self.path, self.size = os.path.basename(path), path, size
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)

    def close(self) -> None:
        self.tensor = None
        try:
            self.map.close()
        except BufferError:  # a view is still alive somewhere; the GC unmaps it later
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShmSender:
    def __init__(
        self,
        link: ControlLink,
        max_regions: int,
        region_bytes: int,
        wait_s: float,
        checksum: str,
        writer: PoolWriter | None = None,
    ):
        self._link, self._max, self._wait_s = link, max_regions, wait_s
        self._writer = writer
        self.capabilities = Capabilities(
            max_payload_bytes=region_bytes,
            same_host_only=True,
            writes_in_place=writer is not None,
            checksum=checksum,
        )
        """Region layers go as descriptors of at most ``region_bytes`` (see client.py)."""
        self._cond = threading.Condition()
        self._free: list[_Region] = []
        self._busy: dict[str, _Region] = {}
        self._current: _Region | None = None

    def staging(self, nbytes: int) -> torch.Tensor:
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._free or self._count() < self._max or self._link.closed, self._wait_s
            ):
                raise PeerLost(f"no shm region released for {self._wait_s}s; receiver stalled")
            if self._link.closed:
                raise PeerLost("link closed while waiting for a shm region")
            region = self._free.pop() if self._free else None
        if region is not None and region.size < nbytes:
            self._retire(region)
            region = None
        if region is None:
            path = os.path.join(_shm_dir(), f"pdserve-kv-{uuid.uuid4().hex}")
            region = _Region(path, max(nbytes, 1 << 20), create=True)
        self._current = region
        return region.tensor[:nbytes]

    def _count(self) -> int:
        return len(self._free) + len(self._busy)

    def _retire(self, region: _Region) -> None:
        _unlink(region.path)
        self._link.try_send(pb.Frame(release=pb.Release(name=region.name)))
        region.close()

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        region, self._current = self._current, None
        desc.shm.CopyFrom(pb.ShmRegion(name=region.name, size=region.size, offset=0))
        with self._cond:
            self._busy[region.name] = region
        try:
            self._link.send(pb.Frame(pages=desc))
        except PeerLost:
            with self._cond:
                self._free.append(self._busy.pop(region.name))
            raise

    # -- in place (shm_pool.py) ------------------------------------------------------------
    def begin(self, transfer_id: str, block_ids: tuple[int, ...]) -> str | None:
        return self._writer.begin(transfer_id, block_ids)

    def write_layer(self, desc: pb.PageDescriptor, job: LayerJob) -> None:
        self._writer.write_layer(desc, job)

    def end(self, transfer_id: str) -> None:
        self._writer.end(transfer_id)

    def on_frame(self, frame: pb.Frame) -> bool:
        if not frame.HasField("release"):
            return False
        with self._cond:
            region = self._busy.pop(frame.release.name, None)
            if region is not None:
                self._free.append(region)
            self._cond.notify_all()
        return True

    def close(self) -> None:
        with self._cond:
            regions = self._free + list(self._busy.values())
            self._free, self._busy = [], {}
            self._cond.notify_all()
        for region in regions:
            _unlink(region.path)
            region.close()
        if self._writer is not None:
            self._writer.close()


class ShmReceiver:
    def __init__(self, link: ControlLink, checksum: str, pool: bool = False):
        self._link = link
        self._maps: dict[str, _Region] = {}
        self.capabilities = Capabilities(
            same_host_only=True, writes_in_place=pool, checksum=checksum
        )
        self.granted = False
        """This link's sender was handed the pool: its in-place descriptors count."""
        self.withdraw: Callable[[], None] = lambda: None

    def in_place_ok(self) -> bool:
        return self.granted

    def chunks(self, desc: pb.PageDescriptor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
        region, offset = self._region_for(desc, sum(sizes)), desc.shm.offset
        for size in sizes:
            yield region.tensor[offset : offset + size]
            offset += size
        self._link.try_send(pb.Frame(release=pb.Release(name=region.name)))

    def discard(self, desc: pb.PageDescriptor) -> None:
        if desc.checksum_in_trailer:
            raise PeerLost("an shm descriptor announced a checksum trailer on the control link")
        self._release(desc.shm.name)

    def _release(self, name: str) -> None:
        self._link.try_send(pb.Frame(release=pb.Release(name=name)))

    def _region_for(self, desc: pb.PageDescriptor, nbytes: int) -> _Region:
        """The mapped region holding the descriptor's ``nbytes``; BadDescriptor (the
        region released unread) if it cannot."""
        ref = desc.shm
        try:
            region = self._map(ref)
            if ref.offset + nbytes > region.size:
                raise ValueError(f"overruns region {region.name} of {region.size} bytes")
        except (OSError, ValueError) as exc:
            self._release(ref.name)
            raise BadDescriptor(f"shm region {ref.name[:80]!r}: {exc}") from None
        return region

    def _map(self, ref: pb.ShmRegion) -> _Region:
        region = self._maps.get(ref.name)
        if region is None:
            if os.path.basename(ref.name) != ref.name or not ref.name.startswith("pdserve-kv-"):
                raise ValueError("not a pdserve region name")
            path = os.path.join(_shm_dir(), ref.name)
            region = _Region(path, ref.size, create=False)
            _unlink(path)  # both sides hold mappings; nothing is left behind on a crash
            self._maps[ref.name] = region
        return region

    def on_frame(self, frame: pb.Frame) -> bool:
        if not frame.HasField("release"):
            return False
        region = self._maps.pop(frame.release.name, None)
        if region is not None:
            region.close()
        return True

    def close(self) -> None:
        self.withdraw()
        for region in self._maps.values():
            region.close()
        self._maps.clear()


class ShmHost:
    """Per endpoint: the shared pool's grants and fence when the KV caches are in one."""

    def __init__(self, args: EndpointArgs):
        self._checksum = checksum_kind(args.config, "none")
        pool = find_pool(args.kv_caches)
        self._grants = PoolGrants(pool, args.config.handshake_timeout_s) if pool else None
        self.fence = PoolFence(pool.fd, pool.owners) if pool else NO_FENCE

    def accept(
        self, link: ControlLink, hello: pb.Hello
    ) -> tuple[dict[str, str], Callable[[], ReceiverPlane]]:
        grants = self._grants
        receiver = ShmReceiver(link, self._checksum, pool=grants is not None)
        params = {"checksum": self._checksum}
        if grants is not None:
            token = grants.offer(lambda: setattr(receiver, "granted", True))
            receiver.withdraw = lambda: grants.withdraw(token)
            try:
                params |= grants.params(token)
            except (RuntimeError, OSError) as exc:  # e.g. CUDA IPC refused: use regions
                logger.warning("shm: cannot share the KV pool (%s); regions only", exc)
                receiver.withdraw()
        return params, lambda: receiver

    def close(self) -> None:
        if self._grants is not None:
            self._grants.close()


def _connect(link: ControlLink, params: Mapping[str, str], config: TransferConfig) -> ShmSender:
    regions = int(config.plane.get("shm_regions", "3"))
    region_bytes = int(config.plane.get("shm_region_bytes", str(16 << 20)))
    checksum = params.get("checksum", "xxh3")  # a receiver that names none predates the option
    writer = None
    if "pool_socket" in params:
        try:
            writer = PoolWriter(link, fetch_pool(params, config.connect_timeout_s), checksum)
        except (OSError, ValueError) as exc:
            logger.warning("shm: cannot map %s's KV pool (%s); sending through regions", link.name, exc)  # fmt: skip
    return ShmSender(link, regions, region_bytes, config.peer_timeout_s, checksum, writer)


BACKEND = Backend(name="shm", host=ShmHost, connect=_connect)
