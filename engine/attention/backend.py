"""Attention backend interface and the per-step metadata every backend reads.

The model runner builds one :class:`AttentionMetadata` per step and passes it explicitly
to every attention layer. Sequences in a step are ordered decodes first::

    tokens:  [ d0 | d1 | ... | d(D-1) | p0 p0 p0 | p1 p1 | ... ]
              └── num_decodes, 1 token each ──┘└── prefill chunks, any length ──┘
    query_start_loc = [0, 1, ..., D, D+len(p0), ...]

``seq_lens[i]`` counts every token of sequence ``i`` that is in the cache after this
step's store (cached context + this step's tokens); ``context_lens[i]`` counts those that
were already there. Row ``i`` of ``block_tables`` lists sequence ``i``'s blocks
(padded with 0 past its last block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, read by every layer."""

    query_start_loc: torch.Tensor
    """int32 ``[B + 1]``: prefix sums of per-sequence query lengths."""
    seq_lens: torch.Tensor
    """int32 ``[B]``: cached tokens after this step's store, per sequence."""
    context_lens: torch.Tensor
    """int32 ``[B]``: tokens already cached before this step, per sequence."""
    block_tables: torch.Tensor
    """int32 ``[B, max_blocks]``: block ids in token order, 0-padded."""
    slot_mapping: torch.Tensor
    """int64 ``[num_tokens]``: destination slot of every new token's K and V."""
    num_decodes: int
    """The first ``num_decodes`` sequences have exactly one query token."""
    max_query_len: int
    max_seq_len: int
    block_size: int
    seq_lens_cpu: tuple[int, ...] = ()
    """``seq_lens`` as Python ints (saves device syncs in reference code)."""
    context_lens_cpu: tuple[int, ...] = ()
    """``context_lens`` as Python ints."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


class AttentionBackend(Protocol):
    """Stores a step's K/V into the paged cache and computes attention over it."""

    name: str

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Write ``key``/``value`` (``[num_tokens, kv_heads, head_dim]``) at ``meta.slot_mapping``."""
        ...

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``query`` (``[num_tokens, heads, head_dim]``) over the cache.

        ``key``/``value`` are this step's new K/V, already stored; a backend may use them
        instead of reading the cache back (a prefill chunk with no cached context).

        Token ``t`` of sequence ``i`` sits at position ``context_lens[i] + t`` and attends to
        positions ``<= `` its own (and, with ``sliding_window=W``, ``> pos - W``).
        Returns ``[num_tokens, heads, head_dim]`` in ``query``'s dtype.
        """
        ...
