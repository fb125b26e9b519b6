"""The quantized KV page layout (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8``).

A quantized cache is a ``uint8`` tensor per layer for K and V, shaped like the dense
one (see ``layout.py``) except that every head row carries its own scale after its
values::

    [num_blocks, block_size, num_kv_heads, head_dim + SCALE_BYTES]   uint8

    one head row of one token:
    ┌──────────── head_dim bytes ────────────┬─ 2 bytes ─┐
    │ q[0] q[1] ... q[D-1]  (fp8 or int8)    │ scale bf16│   x[i] ≈ q[i] * scale
    └────────────────────────────────────────┴───────────┘

Why per token and per head, inline:

* the scale is computed when the token's K/V is stored (prefill, and each decode token),
  from that row's own ``amax``, so no block is ever re-quantized when it fills up and a
  prefix-cache hit or a preempted request's recompute reads exactly what was written;
* the scale lives inside the page bytes, so every transport moves pages and scales as
  they are (a block's bytes are its values and its scales) and a TP rank's head slice
  (``layout.head_view``) takes its scales with it;
* it is the accurate choice: vLLM's default static per-tensor scale of 1.0 relies on K/V
  magnitudes that fit the format unscaled and gives int8 no usable range (measured on
  the 32-prompt set of tests/engine/test_quant_kv.py: int8 8/32 prompts agree with the
  float32 cache with scale 1.0, 32/32 with these scales; fp8_e4m3 31/32 and 32/32);
* per-head scales keep tensor-parallel ranks independent: each quantizes its own heads.

The scale is stored as bfloat16 (fp32's exponent range in two bytes); values are
quantized with the *rounded* scale, so dequantizing with it is consistent. The overhead
is ``2 / head_dim`` of the fp8 bytes: head_dim 128 stores 130 bytes per row against 256
in bf16 (0.508x), head_dim 16 stores 18 against 32 (0.56x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KVCacheDType = Literal["auto", "fp8_e4m3", "fp8_e5m2", "int8"]
SCALE_BYTES = 2
"""Bytes of the bfloat16 scale at the end of every quantized head row."""
_MIN_AMAX = 1e-6
"""A row of zeros (or near) still gets a finite, non-zero scale."""


@dataclass(frozen=True)
class KVQuantFormat:
    """One quantized element format: its torch dtype and the largest value it holds."""

    name: str
    dtype: torch.dtype
    max_value: float

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., D]`` -> packed rows ``[..., D + SCALE_BYTES]`` (uint8)."""
        x = x.float()
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX)
        scale = (amax / self.max_value).to(torch.bfloat16)
        q = (x / scale.float()).clamp(-self.max_value, self.max_value)
        if self.dtype == torch.int8:
            q = q.round()
        q = q.to(self.dtype).view(torch.uint8)
        return torch.cat([q, scale.view(torch.uint8)], dim=-1)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Packed rows ``[..., D + SCALE_BYTES]`` (uint8) -> values ``[..., D]`` in ``dtype``."""
        head_dim = rows.shape[-1] - SCALE_BYTES
        q = rows[..., :head_dim].contiguous().view(self.dtype)
        scale = rows[..., head_dim:].contiguous().view(torch.bfloat16)
        return (q.float() * scale.float()).to(dtype)


FORMATS: dict[str, KVQuantFormat] = {
    "fp8_e4m3": KVQuantFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": KVQuantFormat("fp8_e5m2", torch.float8_e5m2, 57344.0),
    "int8": KVQuantFormat("int8", torch.int8, 127.0),
}
KV_CACHE_DTYPES = ("auto", *FORMATS)


def quant_format(name: str) -> KVQuantFormat | None:
    """The format of ``--kv-cache-dtype name`` (``None`` for ``auto``: the model's dtype)."""
    if name == "auto":
        return None
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unsupported kv_cache_dtype {name!r}; choose one of {list(KV_CACHE_DTYPES)}"
        ) from None


def row_bytes(kv_cache_dtype: str, head_dim: int, element_size: int) -> int:
    """Bytes of one token's head row in the cache: ``head_dim`` values (+ the scale)."""
    if quant_format(kv_cache_dtype) is None:
        return head_dim * element_size
    return head_dim + SCALE_BYTES


def store_quantized(
    fmt: KVQuantFormat,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantize ``key``/``value`` ``[N, Hkv, D]`` into slots ``slot_mapping`` (int64 ``[N]``)
    of packed caches ``[blocks, block_size, Hkv, D + SCALE_BYTES]``."""
    heads, row = k_cache.shape[2], k_cache.shape[3]
    for x, cache in ((key, k_cache), (value, v_cache)):
        cache.view(-1, heads, row).index_copy_(0, slot_mapping, fmt.quantize(x))


def dequantize_blocks(
    fmt: KVQuantFormat, cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks ``block_ids`` (int64 ``[n]``) of a packed cache, dequantized:
    ``[n, block_size, Hkv, D]`` in ``dtype``."""
    return fmt.dequantize(cache.index_select(0, block_ids), dtype)
