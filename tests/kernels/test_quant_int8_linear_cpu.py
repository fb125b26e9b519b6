"""The C INT8 weight-only linear (engine/kernels/cpu_int8_linear.py) against the fp32
dequantize-then-matmul reference, both of its bf16 paths (VNNI and FMA) and fp32.

Shapes include K not a multiple of 16/32 (the masked tail), N not a multiple of the
4-row tile, M = 1..17 (tiles of 4 activation rows and their remainder) and groups. A
dropped scale, a wrong row or group, or a lost tail is off by far more than one bf16
rounding of the output, which is what the tolerance allows."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_int8_linear as k8
from engine.kernels.w8a16_gemm import w8a16_reference
from engine.quant import ops

pytestmark = pytest.mark.skipif(not k8.available(), reason="no C compiler or no AVX-512")
SHAPES = [(7, 100, 1), (33, 64, 2), (64, 1000, 1), (9, 2048, 4), (5, 96, 3), (130, 48, 1)]
PATHS = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)]


def _case(n: int, k: int, groups: int, m: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=gen) * 0.05 + 0.01
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return q, scale, x, bias


def _check(got: torch.Tensor, x, q, scale, bias) -> None:
    want = w8a16_reference(x.float(), q, scale) + bias.float()
    assert got.dtype == x.dtype and got.shape == want.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # one bf16 rounding of the output (2^-8 relative), plus the int16 activations
        err = (got.float() - want).abs()
        assert (err <= want.abs() * 2**-8 + 1e-3 * want.abs().max()).all(), err.max()


@pytest.mark.parametrize(("n", "k", "groups"), SHAPES)
@pytest.mark.parametrize(("dtype", "vnni"), PATHS)
def test_quant_int8_linear_matches_dequantized(n, k, groups, dtype, vnni):
    for m in range(1, 18):
        q, scale, x, bias = _case(n, k, groups, m, dtype, seed=m)
        if groups > 1 and not k8.takes_weight(q, scale):
            pytest.skip(f"group of {k // groups} columns: the kernel refuses it")
        _check(k8.int8_linear(x, q, scale, bias, vnni=vnni), x, q, scale, bias)


@pytest.mark.parametrize(("dtype", "vnni"), PATHS)
def test_quant_int8_linear_strided_rows_and_batch_dims(dtype, vnni):
    q, scale, _, _ = _case(40, 72, 1, 1, dtype)
    wide = torch.randn(2, 3, 100).to(dtype)
    x = wide[..., :72]  # rows strided, as a split leaves them
    got = k8.int8_linear(x, q, scale, None, vnni=vnni)
    assert got.shape == (2, 3, 40)
    _check(got.reshape(6, 40), x.reshape(6, 72), q, scale, torch.zeros(40, dtype=dtype))


def test_quant_int8_linear_large_activations_stay_exact():
    """Activations near bf16's range and 4096 columns: the int32 sums of the VNNI path
    are moved to fp32 every 512 columns, so they cannot overflow."""
    q = torch.full((8, 4096), 127, dtype=torch.int8)
    scale = torch.ones(8, 1)
    x = torch.full((2, 4096), 3.0e4).to(torch.bfloat16)
    _check(k8.int8_linear(x, q, scale, torch.zeros(8).bfloat16()), x, q, scale, torch.zeros(8))


def test_quant_int8_linear_refuses_a_group_of_odd_width():
    q, scale, x, bias = _case(8, 120, 3, 2, torch.bfloat16)  # groups of 40 columns
    assert not k8.takes_weight(q, scale)
    with pytest.raises(ValueError, match="3 groups"):
        k8.int8_linear(x, q, scale, bias)


def test_quant_cpu_linear_takes_the_kernel_for_decode_rows():
    """ops.cpu_linear routes decode rows to the kernel and prefill rows around it."""
    q, scale, _, bias = _case(48, 64, 1, 1, torch.bfloat16)
    scale = scale.to(torch.bfloat16).float()  # as QuantMethod.prepack keeps it
    for rows in (1, ops.INT8_KERNEL_MAX_ROWS, ops.INT8_KERNEL_MAX_ROWS + 3):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        got = ops.cpu_linear(x, q, scale, bias, kernel_scale=scale)
        if rows <= ops.INT8_KERNEL_MAX_ROWS:
            assert torch.equal(got, k8.int8_linear(x, q, scale, bias))
        else:
            want = torch.nn.functional.linear(x, ops.dequantize(q, scale, x.dtype), bias)
            assert torch.equal(got, want)


@pytest.mark.parametrize(("n", "k", "groups"), [(7, 100, 1), (33, 64, 2), (5, 96, 3)])
def test_quant_int8_dequantize_is_bit_equal_to_torch(n, k, groups):
    """The prefill path's one-pass dequantization equals ops.dequantize bit for bit."""
    q, scale, _, _ = _case(n, k, groups, 1, torch.bfloat16)
    rounded = scale.to(torch.bfloat16).float()
    assert torch.equal(k8.dequantize_bf16(q, rounded), ops.dequantize(q, scale, torch.bfloat16))
