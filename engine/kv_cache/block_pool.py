"""A pool of KV blocks with reference counts, a prefix-hash index and LRU eviction.

A block is in exactly one of three states::

    in use      ref_cnt > 0             (held by one or more requests)
    cached      ref_cnt == 0, hashed    (in the free queue, still findable by hash)
    empty       ref_cnt == 0, no hash   (in the free queue)

The free queue is ordered least-recently-freed first. Allocation pops from its head and,
if that block was cached, evicts it from the hash index (lazy eviction). A prefix hit on a
cached block takes it out of the free queue again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    """Tokens the hash covers, checked on every hit (a hash collision must not alias KV)."""


class BlockPool:
    """Owns every block id; hands out, shares, caches and reclaims them."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, KVBlock] = {}
        self.evicted_hashes: list[int] = []
        """Hashes evicted since the last :meth:`drain_events` (for the router's index)."""
        self.stored_hashes: list[int] = []
        """Hashes cached since the last :meth:`drain_events`."""

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take ``n`` blocks from the head of the free queue, evicting cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (taking free cached blocks out of the queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue.

        Pass a sequence's blocks in order: they are queued tail first, so a prefix's
        leading blocks stay cached longest.
        """
        for block in reversed(blocks):
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block for ``block_hash`` if its tokens match, else ``None``."""
        block = self._by_hash.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def cache(self, block: KVBlock, block_hash: int, token_ids: Sequence[int]) -> None:
        """Make a full, computed block findable by its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._by_hash:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._by_hash[block_hash] = block
        self.stored_hashes.append(block_hash)

    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """``(stored, evicted)`` hashes since the last call."""
        stored, evicted = self.stored_hashes, self.evicted_hashes
        self.stored_hashes, self.evicted_hashes = [], []
        return stored, evicted

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of blocks nobody holds."""
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._by_hash.get(block.block_hash) is block:
            del self._by_hash[block.block_hash]
            self.evicted_hashes.append(block.block_hash)
        block.block_hash = None
        block.token_ids = None
