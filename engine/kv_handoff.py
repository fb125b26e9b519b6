"""What the engine hands to a disaggregated worker around the KV of a prompt.

Prefill side: the KV layer hook (``KVLayerHook``) gets, after each layer of a step, the
``LayerKV`` items whose new K/V it must send. Decode side: ``LLMEngine.reserve`` returns a
``Reservation``, the blocks the incoming KV must fill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKV:
    """A prefill-only request's share of one step, for the KV layer hook."""

    request_id: str
    block_ids: tuple[int, ...]
    """The request's whole block table."""
    start_pos: int
    end_pos: int
    """Token positions ``[start_pos, end_pos)`` whose K/V is new to the hook: this step's
    tokens, plus on a request's first step any prefix-cache hit (which the receiver may
    not hold)."""


KVLayerHook = Callable[[int, list[LayerKV], tuple[torch.Tensor, torch.Tensor]], None]
"""``hook(layer, items, (k_cache, v_cache))`` after each layer of a step."""


@dataclass(frozen=True)
class Reservation:
    """Blocks reserved on the decode side for a prompt whose KV comes from elsewhere."""

    request_id: str
    block_ids: tuple[int, ...]
    """The request's whole block table for its prompt."""
    num_cached_blocks: int
    """Leading blocks already in this worker's prefix cache: not to be sent."""

    @property
    def blocks_to_fill(self) -> tuple[int, ...]:
        return self.block_ids[self.num_cached_blocks :]
