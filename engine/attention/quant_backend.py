"""Attention over a quantized KV cache (fp8/int8 head rows + scales, see
``engine/kv_cache/quant.py``): the torch reference, on any device.

Store quantizes each new token's K/V row with its own scale. Attention reads back only
the blocks the step's block tables name, dequantized into a small dense cache, and runs
the dense references of ``torch_backend`` over it with the tables renumbered::

    block_tables (pool ids)      used = unique ids       tables (dense ids)
    [[7, 3, 0],                  [0, 3, 7, 9]            [[2, 1, 0],
     [9, 0, 0]]     ──────►      dense[i] = dq(cache[used[i]])  ──►  [3, 0, 0]]

A prefill chunk with no cached context attends over its own, unquantized K/V (as vLLM's
fp8 cache does): quantization error enters through the cache reads only, so the first
token a prefill worker samples equals the dense cache's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import (
    causal_prefill,
    paged_decode_reference,
    paged_prefill_reference,
)
from engine.kv_cache.quant import KVQuantFormat, dequantize_blocks, quant_format, store_quantized


def dense_blocks(
    fmt: KVQuantFormat,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_blocks: int,
    dtype: torch.dtype,
    dequant: Callable[..., torch.Tensor] = dequantize_blocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``num_blocks`` of every table, dequantized (by ``dequant``: torch here, the
    Triton kernel on CUDA): dense K, V and the tables renumbered into them (int32, same
    shape as ``block_tables[:, :num_blocks]``)."""
    tables = block_tables[:, :num_blocks].to(torch.int64)
    used, local = torch.unique(tables, return_inverse=True)
    k = dequant(fmt, k_cache, used, dtype)
    v = dequant(fmt, v_cache, used, dtype)
    return k, v, local.to(torch.int32)


class QuantizedStore:
    """What every backend over a quantized cache shares: the format ``kv_cache_dtype``
    names, the backend's name (``<kind>+<kv_cache_dtype>``) and the quantizing store."""

    kind = ""

    def __init__(self, kv_cache_dtype: str) -> None:
        fmt = quant_format(kv_cache_dtype)
        if fmt is None:
            raise ValueError(f"{type(self).__name__} needs a quantized kv_cache_dtype")
        self.fmt, self.name = fmt, f"{self.kind}+{kv_cache_dtype}"

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        store_quantized(self.fmt, key, value, k_cache, v_cache, meta.slot_mapping)


class QuantTorchAttentionBackend(QuantizedStore):
    """Paged attention over a quantized cache with the torch references."""

    kind = "torch"

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
        out = torch.empty_like(query)
        nd, starts = meta.num_decodes, meta.query_start_loc.tolist()
        own = [
            i for i in range(nd, meta.num_seqs) if key is not None and meta.context_lens_cpu[i] == 0
        ]
        for i in own:
            s, e = starts[i], starts[i + 1]
            out[s:e] = causal_prefill(query[s:e], key[s:e], value[s:e], scale, sliding_window)
        paged = [i for i in range(meta.num_seqs) if i not in own]
        if not paged:
            return out
        num_blocks = -(-max(meta.seq_lens_cpu[i] for i in paged) // meta.block_size)
        k, v, tables = dense_blocks(
            self.fmt, k_cache, v_cache, meta.block_tables[paged], num_blocks, query.dtype
        )
        if nd:
            out[:nd] = paged_decode_reference(
                query[:nd], k, v, tables[:nd], meta.seq_lens[:nd], scale, sliding_window
            )
        for row, i in enumerate(paged[nd:], start=nd):
            s, e = starts[i], starts[i + 1]
            out[s:e] = paged_prefill_reference(
                query[s:e], k, v, tables[row], meta.context_lens_cpu[i], scale, sliding_window
            )
        return out
