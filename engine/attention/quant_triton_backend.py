"""Triton paged attention over a quantized KV cache (fp8/int8 rows + scales, see
``engine/kv_cache/quant.py``): the GPU backend of ``--kv-cache-dtype``.

Per layer and step::

    store:   K/V rows ──quantize (torch, on the device)──► uint8 cache rows + bf16 scales
    read:    block tables ──unique──► used blocks ──dequant_blocks (Triton)──► dense K/V
             tables renumbered into the dense blocks ──► paged decode / prefill kernels

The attention kernels are the dense ones, unchanged: they read the step's blocks
dequantized by ``engine/kernels/dequant_kv.py`` (one extra pass over the blocks in use,
not over the pool). Finding the blocks in use syncs with the host once per layer.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.attention.backend import AttentionMetadata
from engine.attention.quant_backend import QuantizedStore, dense_blocks
from engine.attention.triton_backend import TritonAttentionBackend
from engine.kernels.dequant_kv import dequant_blocks


class QuantTritonAttentionBackend(QuantizedStore):
    """Paged attention over a quantized cache with Triton kernels (CUDA, or the Triton
    interpreter in tests)."""

    kind = "triton"

    def __init__(self, kv_cache_dtype: str) -> None:
        super().__init__(kv_cache_dtype)
        self._dense = TritonAttentionBackend()

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
        num_blocks = max(1, -(-meta.max_seq_len // meta.block_size))
        k, v, tables = dense_blocks(
            self.fmt, k_cache, v_cache, meta.block_tables, num_blocks, query.dtype,
            dequant=dequant_blocks,
        )  # fmt: skip
        dense_meta = replace(meta, block_tables=tables)
        return self._dense.forward(
            query, k, v, dense_meta, scale=scale, sliding_window=sliding_window
        )
