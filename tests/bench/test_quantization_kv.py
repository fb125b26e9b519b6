"""bench.quantization_kv: the KV figures come from a real pool and a real transfer."""

from __future__ import annotations

import pytest

from bench.quantization_kv import measure_kv


def test_quant_kv_bench_measures_half_the_bytes():
    out = measure_kv(tokens=64, runs=1)
    kv = out["kv"]
    assert set(kv) == {"bf16", "fp8_e4m3", "int8"}
    for row in kv.values():  # the receiver counted exactly what the pool holds per token
        assert row["transfer_bytes_per_token"] == row["pool_bytes_per_token"]
        assert row["tokens"] == 64 and row["transfer_tokens_per_s"] > 0
    assert out["kv_bytes_ratio_fp8"] == pytest.approx(130 / 256)  # head_dim 128 + 2 scale bytes
    assert out["kv_bytes_ratio_fp8"] <= 0.55
    assert out["kv_pool_tokens_ratio_fp8"] == pytest.approx(256 / 130, rel=0.01)
