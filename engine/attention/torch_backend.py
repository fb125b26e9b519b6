"""Pure-torch paged attention: the CPU default and the reference for the Triton kernels.

Decodes (one query token each) run as one padded batch: their block tables gather K/V
into ``[B, max_blocks * block_size, kv_heads, head_dim]`` and a length mask hides the
padding (zeroed as well: stale slots may hold NaN). Prefill chunks run one sequence at a time with a causal mask offset by the
sequence's cached context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionMetadata


def store_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[N, Hkv, D]`` into slots ``slot_mapping`` (int64 ``[N]``)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[B, num_blocks * block_size, Hkv, D]`` for the first ``num_blocks`` of each table."""
    b = block_tables.shape[0]
    index = block_tables[:, :num_blocks].reshape(-1).to(torch.int64)
    return cache.index_select(0, index).view(b, num_blocks * cache.shape[1], *cache.shape[2:])


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention. q ``[B, Q, H, D]``, k/v ``[B, L, Hkv, D]``, mask ``[B, Q, L]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def paged_decode_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence (``[B, H, D]``) over its paged context."""
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max()) if seq_lens.numel() else 0
    num_blocks = -(-max_len // block_size)
    k = _gather(k_cache, block_tables, num_blocks)
    v = _gather(v_cache, block_tables, num_blocks)
    pos = torch.arange(k.shape[1], device=query.device)
    lens = seq_lens.to(query.device).long()[:, None]
    mask = pos[None, :] < lens
    # Slots past a sequence's length hold whatever their block held before (a freed
    # request's KV, NaN included); a masked weight of 0 times NaN is still NaN, so they
    # are zeroed rather than only masked. ``k``/``v`` are gathered copies.
    stale = ~mask[:, :, None, None]
    k.masked_fill_(stale, 0.0)
    v.masked_fill_(stale, 0.0)
    if sliding_window is not None:
        mask &= pos[None, :] > lens - 1 - sliding_window
    return _attend(query[:, None], k, v, mask[:, None, :], scale)[:, 0]


def paged_prefill_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """New tokens of one sequence (``[n, H, D]``) at positions ``context_len + t``, causal."""
    n = query.shape[0]
    seq_len = context_len + n
    block_size = k_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    k = _gather(k_cache, block_table[None], num_blocks)[:, :seq_len]
    v = _gather(v_cache, block_table[None], num_blocks)[:, :seq_len]
    q_pos = torch.arange(context_len, seq_len, device=query.device)[:, None]
    k_pos = torch.arange(seq_len, device=query.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return _attend(query[None], k, v, mask[None], scale)[0]


class TorchAttentionBackend:
    """Reference attention over the paged cache, in plain torch."""

    name = "torch"

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        store_kv_reference(key, value, k_cache, v_cache, meta.slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            out[:nd] = paged_decode_reference(
                query[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                scale,
                sliding_window,
            )
        starts = meta.query_start_loc.tolist()
        for i in range(nd, meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            out[s:e] = paged_prefill_reference(
                query[s:e],
                k_cache,
                v_cache,
                meta.block_tables[i],
                meta.context_lens_cpu[i],
                scale,
                sliding_window,
            )
        return out
