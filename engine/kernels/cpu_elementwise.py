"""Fused elementwise CPU ops (``csrc/elementwise_cpu.c``): residual add + RMSNorm, SiLU-and-
multiply, rotary in place. Each is one pass over memory where the torch code makes two to
five, with the torch code's rounding steps (see the C file). :func:`usable` says whether a
tensor can take them (CPU, fp32/bf16, rows with a contiguous last dim, library built);
callers (``engine/layers/basic.py``) keep their torch code for everything else.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels import cpu_build

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_P, _I64, _I, _I64, _P, _I64, _P, _P, _I64, _I, _I, _F, _I],
    "silu_mul": [_P, _I64, _P, _I64, _I, _I, _I],
    "rotary": [_P, _I64, _I, _P, _I64, _I, _P, _P, _P, _I, _I, _I],
}


def _declare(lib: ctypes.CDLL) -> None:
    for base, args in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{base}_{suffix}")
            fn.restype, fn.argtypes = ctypes.c_int, args


def _fn(base: str, dtype: torch.dtype):
    return getattr(cpu_build.library(_declare), f"{base}_{_SUFFIX[dtype]}")


def usable(*tensors: torch.Tensor) -> bool:
    """All on the CPU in one fp32/bf16 dtype, 2-D rows with a contiguous last dim."""
    t0 = tensors[0]
    return (
        t0.device.type == "cpu"
        and t0.dtype in _SUFFIX
        and all(t.dtype == t0.dtype and t.dim() == 2 and t.stride(-1) == 1 for t in tensors)
        and cpu_build.library(_declare) is not None
    )


def heads_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``x`` ``[T, H, D]`` with heads contiguous within a token (a q/k view of QKV)."""
    return (
        x.dim() == 3
        and x.stride(2) == 1
        and x.stride(1) == x.shape[2]
        and usable(x[:, 0], weight[None])
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (``[N, H]``, or ``[T, H, D]`` heads); with
    ``residual`` (2-D only), first ``residual += x`` in place and normalise that. Returns a
    new contiguous tensor of ``x``'s shape."""
    out = torch.empty(x.shape, dtype=x.dtype)
    dim = x.shape[-1]
    inner, inner_stride = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    res_ptr, res_stride = (residual.data_ptr(), residual.stride(0)) if residual is not None else (None, 0)  # fmt: skip
    _fn("rms_norm", x.dtype)(
        x.data_ptr(), x.stride(0), inner, inner_stride, res_ptr, res_stride, weight.data_ptr(),
        out.data_ptr(), dim, out.numel() // dim, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for rows ``[gate | up]`` of ``gate_up`` ``[N, 2I]`` -> ``[N, I]``."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype)
    _fn("silu_mul", gate_up.dtype)(
        gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), rows, inter,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """NeoX rotary on ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` in place (heads
    contiguous within a token); ``cos``/``sin`` fp32 ``[max_pos, D]``, positions int64."""
    tokens, dim = q.shape[0], q.shape[2]
    pos = positions.contiguous()
    _fn("rotary", q.dtype)(
        q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
        pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, dim, torch.get_num_threads(),
    )  # fmt: skip


def rotary_usable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.dtype in _SUFFIX
        and k.dtype == q.dtype
        and cos.dtype == torch.float32
        and cos.is_contiguous()
        and all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == d for t in (q, k))
        and cpu_build.library(_declare) is not None
    )
