"""A KV cache that a prefill worker on the same host can write straight into.

One memfd holds a fence area and, on the CPU, every layer's K and V, each page-aligned::

    0              fence_bytes     + stride        + 2 x stride
    [ owner[0..N) ][ K of layer 0 ][ V of layer 0 ][ K of layer 1 ] ...
      int64 per block: the generation of the one transfer allowed to write block b (0: none)

On CUDA the caches are one device buffer that a writer opens with a CUDA IPC handle, and
the memfd holds only the fence area. The owner words and byte-range locks over them
(bytes ``[8b, 8b + 8)``) are the fence of kv_transfer's shm zero-copy path; the protocol is
in ``kv_transfer/backends/shm_fence.py``. The memfd has no name in any file system: only a
process handed its descriptor (after an authenticated KV pairing, over a unix socket) can
map it, and nothing is left behind when the worker dies.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache.layout import KVLayout

_PAGE = mmap.PAGESIZE
_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
"""Populated at map time: a first write into an unmapped 4 KiB page costs a fault, which
over a whole layer is of the order of the copy itself."""


def _align(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


@dataclass(frozen=True)
class PoolGeometry:
    """Where each tensor of a pool lies in its memfd (both sides derive it from the layout)."""

    layout: KVLayout
    on_device: bool = False
    """The caches are in device memory (CUDA IPC); the memfd is the fence area only."""

    @property
    def fence_bytes(self) -> int:
        return _align(8 * self.layout.num_blocks)

    @property
    def stride(self) -> int:
        return _align(self.layout.num_blocks * self.layout.block_bytes)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.layout.num_layers * self.stride

    @property
    def file_bytes(self) -> int:
        return self.fence_bytes + (0 if self.on_device else self.cache_bytes)

    def offset(self, layer: int, kv: int) -> int:
        """Byte offset of layer ``layer``'s K (``kv=0``) or V in the cache area."""
        return (2 * layer + kv) * self.stride


def _views(buf: torch.Tensor, geo: PoolGeometry) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n, lay = geo.layout.num_blocks * geo.layout.block_bytes, geo.layout
    out = []
    for layer in range(lay.num_layers):
        k, v = (
            buf[geo.offset(layer, kv) : geo.offset(layer, kv) + n]
            .view(lay.storage_dtype)
            .view(lay.cache_shape)  # fmt: skip
            for kv in (0, 1)
        )
        out.append((k, v))
    return out


class SharedKVPool:
    """Per-layer (K, V) caches in shared memory, plus the fence words (see the docstring)."""

    def __init__(self, fd: int, geometry: PoolGeometry, device_buffer: torch.Tensor | None):
        self.fd, self.geometry = fd, geometry
        size = os.fstat(fd).st_size
        if size < geometry.file_bytes:
            raise ValueError(f"shared KV pool of {size} bytes; its layout needs {geometry.file_bytes}")  # fmt: skip
        self._map = mmap.mmap(fd, geometry.file_bytes, flags=_FLAGS)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        self.owners: np.ndarray = whole[: geometry.fence_bytes].numpy().view(np.int64)
        """``owners[b]``: the generation allowed to write block ``b`` (0: none)."""
        cache_area = device_buffer if device_buffer is not None else whole[geometry.fence_bytes :]
        self.device_buffer = device_buffer
        self.caches = _views(cache_area, geometry)

    @classmethod
    def create(cls, layout: KVLayout, device: torch.device | str = "cpu") -> SharedKVPool:
        """A zeroed pool (the decode worker's), registered so its endpoint finds it."""
        on_device = torch.device(device).type != "cpu"
        geo = PoolGeometry(layout, on_device)
        fd = os.memfd_create("pdserve-kv-pool", os.MFD_CLOEXEC)
        os.ftruncate(fd, geo.file_bytes)  # memfd pages read as zeros
        buf = torch.zeros(geo.cache_bytes, dtype=torch.uint8, device=device) if on_device else None
        pool = cls(fd, geo, buf)
        _POOLS[pool.caches[0][0].data_ptr()] = pool
        return pool

    @classmethod
    def attach(cls, fd: int, layout: KVLayout, cuda: dict[str, str] | None = None) -> SharedKVPool:
        """The writer's view of a pool from its own descriptor of the memfd (and, for a
        pool in device memory, the IPC handle of :meth:`export_cuda`)."""
        buf = _open_cuda(cuda) if cuda else None
        return cls(fd, PoolGeometry(layout, buf is not None), buf)

    def export_cuda(self) -> dict[str, str]:
        """The device buffer's CUDA IPC handle as strings (empty for a host pool).

        Untested on this project's CPU-only development machine (no GPU): see
        tests/gpu/test_shm_direct_cuda.py for the check that runs where there is one."""
        if self.device_buffer is None:
            return {}
        dev, handle, size, offset, ref, ref_off, event, sync = (
            self.device_buffer.untyped_storage()._share_cuda_()
        )
        return {"cuda_device": str(dev), "cuda_handle": handle.hex(), "cuda_size": str(size),
                "cuda_offset": str(offset), "cuda_ref": ref.hex(), "cuda_ref_offset": str(ref_off),
                "cuda_event": event.hex(), "cuda_event_sync": str(int(sync))}  # fmt: skip

    def close(self) -> None:
        """Forget the pool and close its descriptor (dropping this side's fence locks). The
        memory stays mapped until the last tensor view of it is gone: unmapping it under a
        live view would turn every later access into a crash."""
        _POOLS.pop(self.caches[0][0].data_ptr(), None) if self.caches else None
        self.caches, self.owners, self._map, self.device_buffer = (
            [],
            np.empty(0, np.int64),
            None,
            None,
        )
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_cuda(p: dict[str, str]) -> torch.Tensor:
    dev = int(p["cuda_device"])
    with torch.cuda.device(dev):
        storage = torch.UntypedStorage._new_shared_cuda(
            dev, bytes.fromhex(p["cuda_handle"]), int(p["cuda_size"]), int(p["cuda_offset"]),
            bytes.fromhex(p["cuda_ref"]), int(p["cuda_ref_offset"]),
            bytes.fromhex(p["cuda_event"]), bool(int(p["cuda_event_sync"])),
        )  # fmt: skip
        size = int(p["cuda_size"])
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{dev}").set_(storage, 0, (size,), (1,))  # fmt: skip


_POOLS: dict[int, SharedKVPool] = {}


def find_pool(kv_caches) -> SharedKVPool | None:
    """The pool whose caches ``kv_caches`` are (every tensor), else ``None``."""
    if not kv_caches:
        return None
    pool = _POOLS.get(kv_caches[0][0].data_ptr())
    if pool is None or len(pool.caches) != len(kv_caches):
        return None
    same = all(
        a.data_ptr() == c.data_ptr() and b.data_ptr() == d.data_ptr()
        for (a, b), (c, d) in zip(pool.caches, kv_caches, strict=True)
    )
    return pool if same else None
