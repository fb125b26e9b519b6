"""Triton paged attention: the GPU backend (``engine/kernels``), same contract as ``torch``.

One step's tokens arrive decodes first (see ``engine/attention/backend.py``)::

    query rows: [ d0 | d1 | ... | d(D-1) | p0 p0 p0 | p1 p1 | ... ]
                 └─ paged_decode_attention ─┘└─ paged_prefill_attention ──┘
                    (split-KV + reduce)          (varlen causal, paged context)

Both kernels write into one output tensor; neither syncs with the host, because the
metadata's ``max_seq_len`` and ``max_query_len`` size their grids. Sliding-window
attention is supported by both kernels.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionMetadata
from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.paged_prefill_attention import paged_prefill_attention
from engine.kernels.store_kv import store_kv


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any row strides but need a contiguous head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonAttentionBackend:
    """Paged attention with Triton kernels (CUDA, or the Triton interpreter in tests)."""

    name = "triton"

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        store_kv(_rows(key), _rows(value), k_cache, v_cache, meta.slot_mapping)

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
        # key/value (the step's new K/V) are not needed: the kernels read the cache.
        query = _rows(query)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            paged_decode_attention(
                query[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                scale,
                sliding_window=sliding_window,
                max_seq_len=meta.max_seq_len,
                out=out[:nd],
            )
        if meta.num_seqs > nd:
            paged_prefill_attention(
                query,
                k_cache,
                v_cache,
                meta.query_start_loc[nd:],
                meta.context_lens[nd:],
                meta.block_tables[nd:],
                scale,
                sliding_window=sliding_window,
                max_query_len=meta.max_query_len,
                out=out,
            )
        return out
