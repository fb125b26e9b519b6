"""The W8A16 GEMM (Triton; interpreted on CPU) and the CPU quantized matmuls against the
fp32 dequantize-then-matmul reference. A kernel that drops a scale, reads the wrong
group or mis-strides the weight is off by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.w8a16_gemm import w8a16_linear, w8a16_reference
from engine.quant import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(n: int, k: int, kind: str, groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scale = torch.rand(n, groups, generator=gen) * 0.05 + 0.01
    if kind == "int8":
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = (w * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize(("m", "groups"), [(1, 1), (5, 1), (19, 4)])
def test_quant_w8a16_triton_matches_reference(kind, m, groups):
    n, k = 72, 128  # n not a multiple of the 64-wide tile
    q, scale = _weights(n, k, kind, groups)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    q, scale, x, bias = (t.to(DEVICE) for t in (q, scale, x, bias))
    got = w8a16_linear(x, q, scale, bias)
    want = w8a16_reference(x, q, scale) + bias
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_quant_cpu_int8_packed_mm_matches_dequantized():
    """bf16 decode rows take torch's int8 packed kernel; a prefill chunk dequantizes."""
    q, scale = _weights(96, 256, "int8", 1)
    bias = torch.randn(96).to(torch.bfloat16)
    for rows in (1, ops.INT8PACK_MAX_ROWS, ops.INT8PACK_MAX_ROWS + 5):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        got = ops.cpu_linear(x, q, scale, bias, scale.reshape(-1).to(torch.bfloat16))
        want = (w8a16_reference(x.float(), q, scale) + bias.float()).to(torch.bfloat16)
        # bf16 outputs reach ~100 here: one rounding step there is 0.5
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0.5)


def test_quant_fp8_fake_quant_is_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -7.0]])
    q, scale = ops.fp8_quantize_acts(x, per_token=True)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 1)
    assert torch.equal(scale[:, 0], torch.tensor([2.0, 100.0]) / 448)
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0)
