"""Block copies and CRC32C on the CPU (``csrc/kv_copy_cpu.c``) for the KV transfer planes.

:func:`copy_blocks` moves whole blocks between two caches in one memcpy per run of
consecutive ids (no gathered temporary: the shm zero-copy path's one copy per byte).
:func:`crc32c` is the hardware CRC32C, measured against xxh3 in ``bench.checksum``. Both
return ``None`` / ``False`` when the library cannot be built; callers keep a torch path.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from engine.kernels import cpu_build

_P, _I64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32


def _declare(lib: ctypes.CDLL) -> None:
    lib.kv_copy_blocks.restype = ctypes.c_int
    lib.kv_copy_blocks.argtypes = [_P, _P, _P, _P, _I64, _I64]
    lib.kv_crc32c.restype = _U32
    lib.kv_crc32c.argtypes = [_U32, _P, _I64]


def available() -> bool:
    return cpu_build.library(_declare) is not None


def copy_blocks(
    dst: torch.Tensor, dst_ids: np.ndarray, src: torch.Tensor, src_ids: np.ndarray
) -> bool:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for contiguous CPU caches of one block shape
    and dtype; ``dst_ids``/``src_ids`` int64 arrays, already checked to be in range.
    False (nothing copied) where the library is missing."""
    lib = cpu_build.library(_declare)
    if lib is None:
        return False
    d, s = np.ascontiguousarray(dst_ids, np.int64), np.ascontiguousarray(src_ids, np.int64)
    block_bytes = dst[0].numel() * dst.element_size()
    lib.kv_copy_blocks(dst.data_ptr(), d.ctypes.data, src.data_ptr(), s.ctypes.data, len(d), block_bytes)  # fmt: skip
    return True


def crc32c(data: memoryview, crc: int = 0) -> int | None:
    """CRC32C of ``data`` continuing from ``crc``; ``None`` where the library is missing."""
    lib = cpu_build.library(_declare)
    if lib is None:
        return None
    view = np.frombuffer(data, dtype=np.uint8)
    return lib.kv_crc32c(crc, view.ctypes.data, view.nbytes)
