"""The one place that knows how KV pages are laid out in memory.

Every layer owns two tensors, K and V, each shaped::

    [num_blocks, block_size, num_kv_heads, head_dim]
      block b ─┐
               ▼
    ┌──────────────── block 0 ────────────────┐┌──────── block 1 ───────── ...
    │ off 0: [H_kv, D] │ off 1 │ ... │ off B-1 ││ off 0 │ ...
    └──────────────────────────────────────────┘└─────────────────────────── ...

A *slot* is a flat token index into that cache: ``slot = block * block_size + offset``.
A sequence's *block table* lists its blocks in token order, so token position ``p`` of
the sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

With ``kv_cache_dtype`` fp8/int8 the element is a ``uint8`` byte and each head row is
``head_dim + 2`` bytes: the quantized values and their scale (``engine/kv_cache/quant.py``
draws that row). Slot math is the same; the bytes of a block are its values and scales.

The KV transfer layer, the kernels and the engine all use these helpers; none of them
recomputes slot math on its own. What two workers must agree on before pages move between
them (``KVLayoutSpec``) is in ``engine/kv_cache/spec.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels import cpu_kv_copy
from engine.kv_cache.quant import quant_format, row_bytes

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``float16``, ``bfloat16``) to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unsupported KV dtype {name!r}; choose one of {sorted(_DTYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`dtype_from_name`."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; choose one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one worker's paged KV cache."""

    num_layers: int
    """Decoder layers, each with its own K and V tensors."""
    num_blocks: int
    """Blocks in the pool (the same block id indexes every layer)."""
    block_size: int
    """Tokens per block."""
    num_kv_heads: int
    """Key/value heads per layer (after GQA)."""
    head_dim: int
    """Elements per head."""
    dtype: torch.dtype = torch.float32
    """Element type of K and V as attention computes them (the model's dtype)."""
    kv_cache_dtype: str = "auto"
    """How the cache stores them: ``auto`` (as ``dtype``), or quantized ``fp8_e4m3``,
    ``fp8_e5m2``, ``int8`` with a scale per token and head (``engine/kv_cache/quant.py``)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        dtype_name(self.dtype)
        quant_format(self.kv_cache_dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        """Element type of the cache tensors: ``dtype``, or ``uint8`` when quantized."""
        return self.dtype if quant_format(self.kv_cache_dtype) is None else torch.uint8

    @property
    def row_width(self) -> int:
        """Elements of one token's head row: ``head_dim`` (+ the scale bytes when quantized)."""
        return row_bytes(self.kv_cache_dtype, self.head_dim, 1)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of one block of one layer's K (or V): ``[block_size, kv_heads, row_width]``."""
        return (self.block_size, self.num_kv_heads, self.row_width)

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's K (or V) tensor."""
        return (self.num_blocks, *self.block_shape)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.storage_dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (V has the same size), scales included."""
        return self.block_size * self.num_kv_heads * self.row_width * self.element_size

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes per token across all layers (scales included)."""
        return 2 * self.num_layers * self.num_kv_heads * self.row_width * self.element_size

    @property
    def bytes_per_block(self) -> int:
        """K and V bytes of one block id across all layers (what the byte budget buys)."""
        return self.block_size * self.bytes_per_token

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(
        self, device: torch.device | str = "cpu"
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed K and V tensors for every layer."""
        return [
            (
                torch.zeros(self.cache_shape, dtype=self.storage_dtype, device=device),
                torch.zeros(self.cache_shape, dtype=self.storage_dtype, device=device),
            )
            for _ in range(self.num_layers)
        ]


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Global KV heads ``[start, end)`` in the cache of TP rank ``rank`` of ``tp_size``: an
    equal split when there are at least as many heads as ranks, else one head, replicated
    over ``tp_size / num_kv_heads`` ranks::

        4 heads, TP=2:  rank 0 [0, 2)   rank 1 [2, 4)
        1 head,  TP=2:  rank 0 [0, 1)   rank 1 [0, 1)
    """
    if num_kv_heads >= tp_size:
        per = num_kv_heads // tp_size
        return rank * per, (rank + 1) * per
    head = rank * num_kv_heads // tp_size
    return head, head + 1


def head_view(cache: torch.Tensor, heads: tuple[int, int]) -> torch.Tensor:
    """One layer's K or V cache restricted to its KV heads ``[start, end)`` (a view: a TP
    part reads or writes its heads in place within every block)."""
    return cache[:, :, heads[0] : heads[1]]


def slot_mapping(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of token positions ``[start, end)`` of a sequence with ``block_table``."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slot_mapping_tensor(
    block_table: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Vectorised :func:`slot_mapping`: int64 slots for ``positions`` of one sequence."""
    blocks = block_table.to(torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


def gather_blocks(cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Copy ``block_ids`` of one layer's K or V into a contiguous ``[n, *block_shape]``."""
    index = torch.as_tensor(block_ids, dtype=torch.int64, device=cache.device)
    return cache.index_select(0, index)


def scatter_blocks(
    cache: torch.Tensor, block_ids: Sequence[int] | torch.Tensor, pages: torch.Tensor
) -> None:
    """Write contiguous ``pages`` (``[n, *block_shape]``) into ``block_ids`` of ``cache``.

    On CPU, same-dtype pages are copied as int64 rows with numpy fancy indexing: the same
    bytes as ``index_copy_`` at memcpy speed (~27 GB/s here versus ~5 GB/s).
    """
    index = torch.as_tensor(block_ids, dtype=torch.int64, device=cache.device)
    if pages.shape[0] != index.numel() or tuple(pages.shape[1:]) != tuple(cache.shape[1:]):
        raise ValueError(
            f"page shape {tuple(pages.shape)} does not fit {index.numel()} blocks of "
            f"{tuple(cache.shape[1:])}"
        )
    if _cpu_rows_ok(cache) and pages.device.type == "cpu" and pages.dtype == cache.dtype:
        rows = cache.view(cache.shape[0], -1).view(torch.int64).numpy()
        src = pages.contiguous().view(pages.shape[0], -1).view(torch.int64).numpy()
        rows[index.numpy()] = src
        return
    cache.index_copy_(0, index, pages.to(cache.dtype))


def copy_blocks(
    dst: torch.Tensor, dst_ids: Sequence[int], src: torch.Tensor, src_ids: Sequence[int]
) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` between two caches of one block shape and dtype.

    Contiguous CPU caches (the shm zero-copy path into a shared-memory pool): one memcpy per
    run of ids consecutive on both sides, no gathered temporary, so each byte is read and
    written once. Elsewhere (CUDA, or no C compiler): gather + ``index_copy_``.
    """
    d, s = np.asarray(dst_ids, dtype=np.int64), np.asarray(src_ids, dtype=np.int64)
    if d.shape != s.shape or dst.shape[1:] != src.shape[1:] or dst.dtype != src.dtype:
        raise ValueError(
            f"cannot copy {len(s)} blocks of {src.dtype} {tuple(src.shape[1:])} into "
            f"{len(d)} blocks of {dst.dtype} {tuple(dst.shape[1:])}"
        )
    for name, ids, cache in (("dst", d, dst), ("src", s, src)):
        if ids.size and not (0 <= ids.min() and ids.max() < cache.shape[0]):
            raise ValueError(f"{name} block ids out of range [0, {cache.shape[0]})")
    host = dst.device.type == src.device.type == "cpu"
    if host and dst.is_contiguous() and src.is_contiguous():
        if cpu_kv_copy.copy_blocks(dst, d, src, s):
            return
    rows = src.index_select(0, torch.from_numpy(s).to(src.device))
    dst.index_copy_(0, torch.from_numpy(d).to(dst.device), rows.to(dst.device))


def block_byte_views(cache: torch.Tensor, block_ids: Sequence[int]) -> list[memoryview] | None:
    """Writable byte views of ``block_ids`` of a contiguous CPU ``cache`` (``None``
    elsewhere), so a transport can receive straight into the blocks."""
    if cache.device.type != "cpu" or not cache.is_contiguous():
        return None
    flat = memoryview(cache.view(-1).view(torch.uint8).numpy())
    size = cache[0].numel() * cache.element_size()
    return [flat[b * size : (b + 1) * size] for b in block_ids]


def _cpu_rows_ok(cache: torch.Tensor) -> bool:
    block_bytes = cache[0].numel() * cache.element_size()
    return cache.device.type == "cpu" and cache.is_contiguous() and block_bytes % 8 == 0
