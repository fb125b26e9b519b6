"""The fence of the shm zero-copy path: who may write a block of the shared KV pool.

A prefill worker writes pages straight into the decode worker's shared pool
(engine/kv_cache/shared_pool.py), so the receiver cannot drop a late page the way it does
on the other backends: the bytes are already there. Instead a writer may write block ``b``
only while it holds the lock on ``b``'s owner word *and* that word is its transfer's
generation, and the receiver reclaims a block only by taking the same lock::

    receiver  expect(T)            owner[b] = gen(T) for T's blocks (before the ticket leaves)
    writer    open(T)              lock every run of T's blocks (waits for a reclaim under way)
                                   owner[b] == gen(T) for all?  no: unlock, T refused
                                   ... writes any layer of T's blocks, any number of times ...
              T ends               after its last write (all layers, or FAILED / abort heard)
                                   -> unlock
    receiver  T ends               lock T's blocks (waits while the writer holds them)
                                   owner[b] = 0, unlock -> then: SUCCESS declared / blocks freed

Locks are OFD byte-range locks (``F_OFD_SETLK``) on bytes ``[8b, 8b + 8)`` of the pool's
memfd. They belong to an open file description, so every writer opens the memfd anew and
the kernel drops a writer's locks when it dies. Hence:

- a killed writer leaves only torn pages in its own transfer's blocks, which the receiver
  frees (it never admits a layer without the writer's "written" descriptor);
- a stopped writer keeps its locks: the receiver fails the transfer (peer timeout, lease)
  but frees its blocks only once the writer resumes and lets go, or dies;
- no writer can write a block after the receiver reclaimed it, because the receiver cannot
  reclaim a block a writer may still write, and a reclaimed block's owner word no longer
  names that writer's transfer (generations are 63 random bits of the transfer id).

What the fence does not cover: a writer whose code ignores it (the same trust as any peer
that proved the cluster secret; the pool is handed only to such peers).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 / arm64


def generation(transfer_id: str) -> int:
    """A transfer's owner-word value: 63 bits of its random id, never 0."""
    return (int(transfer_id[:16], 16) & ((1 << 63) - 1)) | 1


def runs(block_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` ranges of consecutive ids in ``sorted(block_ids)``."""
    ids = sorted(block_ids)
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        yield ids[i], ids[j - 1] + 1
        i = j


def _lock(fd: int, start: int, stop: int, kind: int, wait: bool) -> bool:
    """Lock (``F_WRLCK``) or unlock (``F_UNLCK``) the owner words of blocks [start, stop)."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, 8 * start, 8 * (stop - start), 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
        return True
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: some kernels report a held lock so
        return False


class PoolFence:
    """Both sides of the fence over one pool, each through its own open of the memfd."""

    def __init__(self, fd: int, owners: np.ndarray):
        self._fd, self._owners = fd, owners

    # -- writer (prefill side) ------------------------------------------------------------
    def acquire(self, transfer_id: str, block_ids: Sequence[int]) -> bool:
        """Lock ``block_ids`` and check they are the transfer's; False (nothing held) if
        they are not: the transfer ended, or the ticket is not the receiver's."""
        spans = list(runs(block_ids))
        for start, stop in spans:  # ascending, as revoke: see there
            _lock(self._fd, start, stop, fcntl.F_WRLCK, wait=True)
        gen = generation(transfer_id)
        if all(self._owners[a:b].min() == gen for a, b in spans):
            return True
        self.release(block_ids)
        return False

    def release(self, block_ids: Sequence[int]) -> None:
        for start, stop in runs(block_ids):
            _lock(self._fd, start, stop, fcntl.F_UNLCK, wait=False)

    # -- receiver (decode side): kv_transfer.plane.Fence -----------------------------------
    def claim(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        self._owners[np.asarray(block_ids, dtype=np.int64)] = generation(transfer_id)

    def revoke(self, transfer_id: str, block_ids: Sequence[int], then: Callable[[], None]) -> None:
        # Both sides lock runs in ascending order (a writer waits at each), so the runs
        # held here are always a prefix: no two parties can wait on each other.
        spans = list(runs(block_ids))
        held = 0
        while held < len(spans) and _lock(self._fd, *spans[held], fcntl.F_WRLCK, wait=False):
            held += 1
        if held == len(spans):
            self._reclaim(spans, then)
            return
        logger.info("transfer %s: its writer still holds blocks; freeing them once it lets go", transfer_id)  # fmt: skip

        def wait() -> None:  # a writer that is alive (maybe stopped) holds them: wait
            for start, stop in spans[held:]:
                _lock(self._fd, start, stop, fcntl.F_WRLCK, wait=True)
            self._reclaim(spans, then)

        threading.Thread(target=wait, name=f"kv-fence-{transfer_id[:8]}", daemon=True).start()

    def _reclaim(self, spans: list[tuple[int, int]], then: Callable[[], None]) -> None:
        for start, stop in spans:
            self._owners[start:stop] = 0
            _lock(self._fd, start, stop, fcntl.F_UNLCK, wait=False)
        then()
