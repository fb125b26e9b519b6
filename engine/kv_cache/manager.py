"""Per-request view of the block pool: prefix hits, slot allocation, caching, freeing.

For a request with ``n`` tokens computed and ``m`` new tokens this step::

    blocks held:  [ b0 | b1 | b2 ]          ceil(n / block_size) blocks
    needed:       [ b0 | b1 | b2 | b3 | b4 ] ceil((n + m) / block_size) blocks
                                 └─new──┘

Full blocks are registered in the prefix index as soon as their tokens are scheduled:
within a step every layer stores all K/V before any attention reads it, so a later
request in the same step may already hit them.

Expert parallelism places each request's KV on one rank; that bookkeeping wraps this
manager from outside (engine/parallel/ep_kv.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.hashing import ROOT_HASH, hash_blocks
from engine.request import Request


@dataclass(frozen=True)
class PrefixHit:
    """Blocks a new request can reuse, and how many tokens they cover."""

    blocks: list[KVBlock]
    num_tokens: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def holds(self, request_id: str) -> bool:
        return request_id in self._blocks

    def request_ids(self) -> list[str]:
        """Every request holding blocks."""
        return list(self._blocks)

    def block_hashes(self, request: Request) -> list[int]:
        """Chained hashes of the request's full blocks (extended incrementally)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        if len(hashes) < len(tokens) // self.block_size:
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.extend(hash_blocks(tokens, self.block_size, parent, start_block=len(hashes)))
        return hashes

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest cached prefix of the request, leaving at least one token to compute."""
        return self.prefix_of(request, self.hit_chain(request))

    def hit_chain(self, request: Request) -> list[KVBlock]:
        """The request's full blocks found in the prefix cache, in order (maybe all)."""
        if not self.enable_caching:
            return []
        tokens, bs = request.all_token_ids, self.block_size
        hits: list[KVBlock] = []
        for i, h in enumerate(self.block_hashes(request)):
            block = self.pool.lookup(h, tokens[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits

    def prefix_of(self, request: Request, hits: list[KVBlock]) -> PrefixHit:
        """The usable prefix of a hit chain: the last token must be computed (logits)."""
        if hits and len(hits) * self.block_size >= request.num_tokens:
            hits = hits[:-1]
        return PrefixHit(hits, len(hits) * self.block_size)

    def allocate(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: PrefixHit | None = None,
        cache: bool = True,
    ) -> bool:
        """Reserve slots for ``num_new_tokens`` more tokens; ``False`` (and no change) if the
        pool is short. ``cache=False`` defers prefix registration (KV filled from outside)."""
        held = self._blocks.get(request.request_id, [])
        hit_blocks = prefix.blocks if prefix else []
        computed = request.num_computed_tokens + (prefix.num_tokens if prefix else 0)
        need = -(-(computed + num_new_tokens) // self.block_size) - len(held) - len(hit_blocks)
        reclaimable = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimable:
            return False
        self.pool.touch(hit_blocks)
        blocks = self._blocks.setdefault(request.request_id, held)
        blocks.extend(hit_blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        if cache:
            self.cache_blocks(request, computed + num_new_tokens)
        return True

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks covering its first ``num_tokens`` tokens."""
        if not self.enable_caching:
            return
        rid = request.request_id
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        done = self._num_cached.get(rid, 0)
        if num_full <= done:
            return
        hashes, tokens, bs = self.block_hashes(request), request.all_token_ids, self.block_size
        for i in range(done, num_full):
            self.pool.cache(self._blocks[rid][i], hashes[i], tokens[i * bs : (i + 1) * bs])
        self._num_cached[rid] = num_full

    def free(self, request_id: str) -> None:
        """Release every block the request holds (cached ones stay findable until evicted)."""
        blocks = self._blocks.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)
