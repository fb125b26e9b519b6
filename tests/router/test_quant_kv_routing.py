"""The router's cost model and metrics see a quantized KV cache's bytes per token."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.kv_cache.spec import KVLayoutSpec
from router.metrics import Metrics
from router.policy import CostPolicy
from router.state.base import WorkerRecord

BF16 = KVLayoutSpec("fp", 2, 2, 16, "bfloat16", 16)


def worker(wid: str, role: str, spec: KVLayoutSpec) -> WorkerRecord:
    return WorkerRecord(wid, role, f"{wid}:1", spec, 64, 2048, 1)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quant_kv_halves_the_predicted_transfer_time(kv_cache_dtype):
    """At one measured bandwidth, a prompt's predicted KV transfer time scales with the
    decode worker's bytes per token: (head_dim + 2) / (2 x head_dim) of bf16's."""
    quant = replace(BF16, kv_cache_dtype=kv_cache_dtype)
    assert quant.bytes_per_token == 2 * 2 * 2 * (16 + 2)
    assert BF16.bytes_per_token == 2 * 2 * 2 * 16 * 2
    times = {}
    for spec in (BF16, quant):
        policy = CostPolicy()
        p, d = worker("p0", "prefill", spec), worker("d0", "decode", spec)
        compute = policy.remote_ttft(p, d, 64)
        policy.observe_transfer("p0", "d0", 1 << 20, 1.0)  # 1 MiB/s measured
        times[spec.kv_cache_dtype] = policy.remote_ttft(p, d, 64) - compute
    assert times[kv_cache_dtype] / times["auto"] == pytest.approx(18 / 32)


def test_quant_kv_pool_metrics_report_tokens_and_bytes_per_token():
    m = Metrics()
    m.kv_pool("d0", 100, replace(BF16, kv_cache_dtype="fp8_e4m3"))
    text = m.render().decode()
    assert 'pdserve_kv_pool_tokens{worker="d0"} 1600.0' in text
    assert 'pdserve_kv_bytes_per_token{worker="d0"} 144.0' in text
    m.forget_worker("d0")
    assert 'worker="d0"' not in m.render().decode()
