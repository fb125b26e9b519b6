"""Small building blocks: linear layers, RMSNorm, rotary embedding, the gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_elementwise as fused
from engine.model_spec import RopeSpec

_PACKABLE = (torch.float32, torch.bfloat16)


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN takes this weight (a CPU fp32/bf16 matrix) in its blocked layout."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` reordered once into oneDNN's blocked layout (an opaque
    mkldnn tensor that :func:`packed_linear` multiplies with)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with uninitialised weights (the loader fills them).

    On the CPU, :meth:`prepack` (the loader calls it once the weights are in) moves the
    weight into oneDNN's blocked layout and drops the plain copy: oneDNN's prepacked GEMM
    runs 2-4x faster than ``F.linear``'s fp32 path on CPUs where MKL is slow (AMD), and
    nothing is re-laid out per step. Only one copy of the weight stays resident.

    A quantized checkpoint gives the layer a ``quant`` method (engine/quant/linear.py):
    the weight is then 8-bit with a ``weight_scale``, and the method does the product.
    """

    quant = None
    """The layer's :class:`~engine.quant.linear.QuantMethod`, if its weight is quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        if self.quant is not None:
            self.quant.prepack(self)
        elif self.packed is None and can_prepack(self.weight):
            self.packed = prepack_weight(self.weight)
            self.weight = None  # the packed copy is the only one kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.quant is not None:
            return self.quant.apply(self, x)
        return F.linear(x, self.weight, self.bias)


def prepack_linears(model: nn.Module) -> int:
    """Prepack every :class:`Linear` (and anything else with a ``prepack``) of ``model``
    for the CPU; returns how many modules were asked."""
    modules = [m for m in model.modules() if m is not model and hasattr(m, "prepack")]
    for m in modules:
        m.prepack()
    return len(modules)


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, as Hugging Face does.

    ``norm(x)`` returns the normalised ``x``; ``norm(x, residual)`` first adds ``x`` to the
    residual stream and returns ``(normalised sum, sum)`` -- on the CPU in one fused pass
    that updates ``residual`` in place (``engine/kernels/cpu_elementwise.py``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            if fused.usable(x, self.weight[None]) or fused.heads_usable(x, self.weight):
                return fused.rms_norm(x, self.weight, self.eps)
            return self._norm(x)
        if fused.usable(x, residual, self.weight[None]):
            return fused.rms_norm(x, self.weight, self.eps, residual), residual
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, including the llama3 long-context rescaling."""
    inv = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if spec.rope_type != "llama3":
        return inv
    old = spec.original_max_position_embeddings
    low_wavelen, high_wavelen = old / spec.low_freq_factor, old / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """NeoX-style rotary embedding over the whole head, with a cached cos/sin table."""

    def __init__(self, spec: RopeSpec, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv = rope_inv_freq(spec, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``q`` ``[T, Hq, D]`` and ``k``; on the CPU in place (fused)."""
        if fused.rotary_usable(q, k, self.cos):
            fused.rotary_(q, k, positions, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = Linear(hidden, 2 * intermediate)
        self.down = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for rows ``[gate | up]`` (fused on the CPU)."""
    if fused.usable(gate_up):
        return fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
