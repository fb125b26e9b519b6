"""Writing received pages into a KV cache tensor at destination block ids.

    chunk (bytes of pages [n, block_size, kv_heads, head_dim]) -> cache[block_ids[i]] = page i

The layout knowledge (and the fast CPU path) lives in ``engine.kv_cache.layout``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_cache.layout import block_byte_views, scatter_blocks


class PageWriter:
    """Scatters page bytes into one K or V cache tensor."""

    def __init__(self, cache: torch.Tensor):
        self.cache = cache

    def block_views(self, block_ids: Sequence[int]) -> list[memoryview] | None:
        """Writable byte views of ``block_ids`` (CPU caches only), for scatter receives."""
        return block_byte_views(self.cache, block_ids)

    def checksum_views(self, block_ids: Sequence[int]) -> list[memoryview | torch.Tensor]:
        """What a checksum reads for ``block_ids``: byte views (host) or gathered pages."""
        views = self.block_views(block_ids)
        if views is not None:
            return views
        return [self.cache.index_select(0, torch.as_tensor(list(block_ids), device=self.cache.device))]  # fmt: skip

    def write(self, block_ids: Sequence[int], chunk: torch.Tensor) -> None:
        """Write ``chunk`` (uint8 bytes of ``len(block_ids)`` pages) into ``block_ids``."""
        pages = chunk.view(self.cache.dtype).view(len(block_ids), *self.cache.shape[1:])
        scatter_blocks(self.cache, list(block_ids), pages.to(self.cache.device))
