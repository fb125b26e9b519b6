"""Launch-time helpers shared by the kernel files (no kernels live here)."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated with ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Refuse CPU tensors for a compiled kernel with an error that names the fix."""
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise RuntimeError(
                f"Triton kernels need CUDA tensors, got a tensor on {t.device}; use the "
                "'torch' attention backend on CPU (or set TRITON_INTERPRET=1 before "
                "importing engine.kernels, for tests)"
            )


def check_kv_dtype(cache: torch.Tensor) -> None:
    if cache.dtype not in KV_DTYPES:
        raise ValueError(f"unsupported KV dtype {cache.dtype}; choose one of {list(KV_DTYPES)}")


def upcast_dots(kernel: object, dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` tiles should be fp32 (with exact IEEE products).

    The interpreter's ``tl.dot`` on bf16 returns garbage, so it always upcasts. On GPU
    fp32 KV must not silently drop to TF32; fp16/bf16 stay on the tensor cores.
    """
    return is_interpreted(kernel) or dtype == torch.float32
