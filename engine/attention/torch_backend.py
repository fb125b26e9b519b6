"""The CPU attention backend, and the pure-torch reference for every attention kernel.

``TorchAttentionBackend`` (the CPU default) reads the paged cache in place, with no
per-step gather, whenever the compiled CPU kernel (``engine/kernels/cpu_paged_attention``)
is available for the dtype and shape:

* decodes, and prefill tokens over a cached prefix: one kernel call over the block
  table, one row per query token (a prefill token at position ``p`` is a row of length
  ``p + 1``, which makes it causal);
* a prefill chunk with no cached context: ``scaled_dot_product_attention`` on the step's
  own K/V (causal flash attention), never reading the cache back.

Otherwise (no C compiler, float16, shapes past the kernel's limits) it runs the
references below: decodes as one padded batch whose block tables gather K/V into
``[B, max_blocks * block_size, kv_heads, head_dim]`` under a length mask (padding zeroed too: stale slots may hold NaN), prefill chunks
one sequence at a time with a causal mask offset by the cached context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionMetadata
from engine.kernels import cpu_paged_attention as cpu_kernel


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


def causal_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """A prefill chunk with no cached context, from its own K/V (``[n, H|Hkv, D]``)."""
    n = query.shape[0]
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
    if sliding_window is None or n <= sliding_window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        pos = torch.arange(n, device=query.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def prefill_rows(meta: AttentionMetadata, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-table rows and lengths for the tokens of prefill sequences ``seqs``: token
    ``t`` of sequence ``i`` is a row of length ``context_lens[i] + t + 1``."""
    starts = meta.query_start_loc.tolist()
    counts = torch.tensor([starts[i + 1] - starts[i] for i in seqs])
    tables = meta.block_tables[seqs].repeat_interleave(counts, dim=0)
    lens = [
        meta.context_lens_cpu[i] + t + 1 for i in seqs for t in range(starts[i + 1] - starts[i])
    ]
    return tables, torch.tensor(lens, dtype=torch.int32)


class TorchAttentionBackend:
    """Paged attention on the CPU: the compiled kernel where it applies, else the torch
    reference (on any device)."""

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
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if key is None or not self._use_kernel(query, k_cache):
            return self.reference(query, k_cache, v_cache, meta, scale, sliding_window)
        out = torch.empty_like(query)
        nd, starts = meta.num_decodes, meta.query_start_loc.tolist()
        if nd:
            cpu_kernel.paged_attention_rows(
                query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                scale, sliding_window, out=out[:nd],
            )  # fmt: skip
        cached = [i for i in range(nd, meta.num_seqs) if meta.context_lens_cpu[i] > 0]
        for i in range(nd, meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            if meta.context_lens_cpu[i] == 0:
                out[s:e] = causal_prefill(query[s:e], key[s:e], value[s:e], scale, sliding_window)
        if cached:
            tables, lens = prefill_rows(meta, cached)
            index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in cached])
            rows = cpu_kernel.paged_attention_rows(
                query[index], k_cache, v_cache, tables, lens, scale, sliding_window
            )
            out[index] = rows
        return out

    @staticmethod
    def _use_kernel(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
        h, hkv, d, bs = query.shape[1], k_cache.shape[2], k_cache.shape[3], k_cache.shape[1]
        return (
            query.device.type == "cpu"
            and query.dtype == k_cache.dtype
            and cpu_kernel.supports(query.dtype, h, hkv, d, bs)
            and cpu_kernel.available()
        )

    @staticmethod
    def reference(
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """The gather-based reference over the cache (what the kernel path is tested against)."""
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
