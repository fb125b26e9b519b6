"""The fused CPU elementwise ops against the torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_elementwise as fused
from engine.layers.basic import RMSNorm, RotaryEmbedding
from engine.model_spec import RopeSpec
from tests.kernels.paged_cases import TOLERANCE, randn

pytestmark = pytest.mark.skipif(not fused.usable(torch.zeros(1, 1)), reason="no C compiler")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 100])
def test_rms_norm_with_and_without_residual(dtype, dim):
    norm = RMSNorm(dim, 1e-6).to(dtype)
    norm.weight.copy_(1 + 0.1 * randn((dim,), torch.float32, 1))
    wide = randn((7, dim + 8), dtype, 2)
    x = wide[:, :dim]  # strided rows, as a split leaves them
    torch.testing.assert_close(
        fused.rms_norm(x, norm.weight, 1e-6), norm._norm(x), **TOLERANCE[dtype]
    )
    residual = randn((7, dim), dtype, 3)
    want_sum = residual + x
    got = fused.rms_norm(x, norm.weight, 1e-6, residual)
    torch.testing.assert_close(residual, want_sum, **TOLERANCE[dtype])  # updated in place
    torch.testing.assert_close(got, norm._norm(want_sum), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_qkv_view(dtype):
    """Qwen3's q/k norm: [T, H, D] views of the QKV output (two strides)."""
    norm = RMSNorm(16, 1e-6).to(dtype)
    norm.weight.copy_(1 + 0.1 * randn((16,), torch.float32, 6))
    q = randn((5, 3 * 4 * 16), dtype, 7)[:, : 4 * 16].view(5, 4, 16)
    assert fused.heads_usable(q, norm.weight)
    torch.testing.assert_close(norm(q), norm._norm(q), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [32, 45])
def test_silu_mul(dtype, inter):
    gate_up = 4 * randn((9, 2 * inter), dtype, 4)  # wide range: large |gate| both signs
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place(dtype):
    rope = RotaryEmbedding(RopeSpec(theta=10000.0), 32, 64)
    qkv = randn((5, (4 + 2 * 2) * 32), dtype, 5)
    q, k, _ = qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1)
    q, k = q.view(5, 4, 32), k.view(5, 2, 32)
    positions = torch.tensor([0, 3, 17, 40, 63])
    cos = rope.cos[positions].to(dtype)[:, None, :]
    sin = rope.sin[positions].to(dtype)[:, None, :]

    def rot(x):
        return torch.cat((-x[..., 16:], x[..., :16]), dim=-1)

    want_q, want_k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    assert fused.rotary_usable(q, k, rope.cos)
    got_q, got_k = rope(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the QKV buffer
    torch.testing.assert_close(got_q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, want_k, **TOLERANCE[dtype])
