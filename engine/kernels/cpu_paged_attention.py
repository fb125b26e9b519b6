"""CPU paged attention over the block table (``csrc/paged_attention_cpu.c``), no gather.

Every row is one query token with its own context length and block-table row::

    rows:        [ d0 | d1 | ... | p0@ctx | p0@ctx+1 | ... ]   decodes, then prefill tokens
    seq_lens:    [ L0 | L1 | ... | ctx+1  | ctx+2    | ... ]   tokens each row attends to
    tables[r]:   block ids of row r's sequence (int32, 0-padded)

    k_cache[block_tables[r, t // bs], t % bs, kv_head, :]  is token t of row r

so decode and prefill over a cached prefix run in one call and causality is the row's
``seq_len``. The C source is compiled once per machine (``engine/kernels/cpu_build.py``)
and called through ctypes. Where no compiler is found, :func:`available` is false and callers use the torch
reference (``engine/attention/torch_backend.py``), which is also what the tests compare
this kernel with.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from engine.kernels import cpu_build

logger = logging.getLogger(__name__)
_DTYPES = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16"}


def _declare(lib: ctypes.CDLL) -> None:
    for name in _DTYPES.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        fn.argtypes += [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_int] * 2


def _library() -> ctypes.CDLL | None:
    return cpu_build.library(_declare)


def available() -> bool:
    """True when the kernel is compiled (or compilable) on this machine."""
    return _library() is not None


def supports(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, bs: int) -> bool:
    """Within the kernel's fixed limits (group <= 32, head_dim <= 256, block <= 256)?"""
    return dtype in _DTYPES and heads // kv_heads <= 32 and head_dim <= 256 and bs <= 256


def paged_attention_rows(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each query row ``[R, H, D]`` over its first ``seq_lens[r]`` cached tokens.

    ``block_tables`` int32 ``[R, max_blocks]`` (rows may repeat a sequence's table),
    ``seq_lens`` int32 ``[R]``; caches ``[num_blocks, block_size, Hkv, D]`` with a
    contiguous head dim. Returns ``out`` (``[R, H, D]``, ``query``'s dtype).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU paged-attention kernel is not available on this machine")
    rows, heads, dim = query.shape
    kv_heads, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    assert query.stride(-1) == k_cache.stride(-1) == out.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and block_tables.stride(-1) == 1
    tables, lens = block_tables.to(torch.int32), seq_lens.to(torch.int32).contiguous()
    strides = torch.tensor(
        [*query.stride()[:2], *out.stride()[:2], *k_cache.stride()[:3]], dtype=torch.int64
    )
    rc = getattr(lib, _DTYPES[query.dtype])(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        tables.stride(0), lens.data_ptr(), out.data_ptr(), rows, heads, kv_heads, dim, bs,
        strides.data_ptr(), scale, sliding_window or 0, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"shape outside the CPU kernel's limits: {tuple(query.shape)}, bs={bs}")
    return out
