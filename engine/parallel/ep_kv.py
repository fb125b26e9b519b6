"""Home ranks for expert parallelism's data-parallel attention, around the block manager.

Every request gets a *home rank* when it is first allocated: the rank holding its
prefix-cache hit, else the one holding the fewest requests (then blocks, then the lowest
rank). Its KV lives only there (block ids are global; each rank has a full-size cache
tensor). Each block remembers the home of its last allocation; a prefix hit is only valid
on the home that holds it, so the hit chain stops at the first block of another rank::

    cached chain:  b3(home 1) ─ b7(home 1) ─ b2(home 0)     request hits [b3, b7], home 1

The scheduler sees the plain :class:`KVCacheManager` interface; the EP driver reads
:meth:`EPCacheManager.home` for each step (engine/parallel/ep_driver.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import takewhile

from engine.kv_cache.manager import KVCacheManager, PrefixHit
from engine.request import Request


@dataclass(frozen=True)
class HomedHit(PrefixHit):
    home: int | None = None
    """EP rank whose cache holds the hit blocks; ``None`` when there is no hit."""


class EPCacheManager(KVCacheManager):
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, num_ranks: int = 2
    ) -> None:
        super().__init__(num_blocks, block_size, enable_caching)
        self.num_ranks = num_ranks
        self._home: dict[str, int] = {}
        self._block_home = [0] * num_blocks

    def home(self, request_id: str) -> int:
        """EP rank holding the request's KV (0 for a request that holds nothing)."""
        return self._home.get(request_id, 0)

    def block_home(self, block_id: int) -> int:
        """EP rank whose cache holds the block's data (its last allocator's home)."""
        return self._block_home[block_id]

    def home_load(self) -> list[tuple[int, int]]:
        """``(requests, blocks)`` held per home rank."""
        load = [(0, 0)] * self.num_ranks
        for rid, home in self._home.items():
            n, b = load[home]
            load[home] = (n + 1, b + len(self._blocks.get(rid, ())))
        return load

    def find_prefix(self, request: Request, home: int | None = None) -> HomedHit:
        """The longest cached prefix all on one home rank (``home``, or the first hit
        block's), leaving at least one token to compute."""
        chain = self.hit_chain(request)
        if home is None and chain:
            home = self._block_home[chain[0].block_id]
        chain = list(takewhile(lambda b: self._block_home[b.block_id] == home, chain))
        hit = self.prefix_of(request, chain)
        return HomedHit(hit.blocks, hit.num_tokens, home if hit.blocks else None)

    def pick_home(self, prefix: PrefixHit | None) -> int:
        """Home for a request being admitted: its hit's rank, else the least-loaded one."""
        if isinstance(prefix, HomedHit) and prefix.home is not None:
            return prefix.home
        load = self.home_load()
        return min(range(self.num_ranks), key=lambda r: (load[r], r))

    def allocate(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: PrefixHit | None = None,
        cache: bool = True,
        home: int | None = None,
    ) -> bool:
        """As :meth:`KVCacheManager.allocate`; a request's first allocation fixes its
        home (``home``, else :meth:`pick_home`) and the new blocks take it."""
        rid = request.request_id
        if rid in self._home:
            home = self._home[rid]
        elif home is None:  # a prompt to score runs on the leader (it has the rows scored)
            scored = request.sampling_params.prompt_logprobs is not None
            home = 0 if scored and not request.prompt_logprobs_done else self.pick_home(prefix)
        start = len(self._blocks.get(rid, ())) + (len(prefix.blocks) if prefix else 0)
        if not super().allocate(request, num_new_tokens, prefix, cache):
            return False
        self._home[rid] = home
        for block in self._blocks[rid][start:]:
            self._block_home[block.block_id] = home
        return True

    def free(self, request_id: str) -> None:
        self._home.pop(request_id, None)
        super().free(request_id)
