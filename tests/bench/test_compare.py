"""bench.compare's pieces that need no cluster: interleaved runs, the analysis, the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.compare import interleaved, prefill_heavy_mix
from bench.compare_report import analyse
from bench.serve.metrics import RequestRecord
from bench.serve.runner import RunConfig
from tests.bench.fake_server import FakeServer


def test_workload_mix_is_seeded_and_prefill_heavy():
    reqs = prefill_heavy_mix(200, seed=1, vocab=512)
    assert reqs == prefill_heavy_mix(200, seed=1, vocab=512)
    heavy = [r for r in reqs if r.prompt_len > 1000]
    assert 120 < len(heavy) < 180 and all(r.output_len <= 10 for r in heavy)
    assert all(r.prompt_len + r.output_len <= 2048 for r in reqs)  # fits the tiny model


def test_interleaved_runs_every_request_once_per_setup():
    servers = {"aggregated": FakeServer(), "disaggregated": FakeServer()}
    try:
        reqs = prefill_heavy_mix(7, seed=0, vocab=64)[:7]
        reqs = [type(r)(r.prompt[:20], 20, 2) for r in reqs]
        got = interleaved({n: SimpleNamespace(url=s.url) for n, s in servers.items()}, reqs,
                          RunConfig(progress=False, goodput={"e2el": 60_000}), segments=3)  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
    for name, server in servers.items():
        assert sorted(b["prompt"] for b in server.state.bodies) == sorted(r.prompt for r in reqs)
        g = got[name]
        assert len(g["records"]) == 7 and g["summary"]["completed"] == 7
        assert g["summary"]["good_requests"] == 7
        assert g["summary"]["duration_s"] == g["duration_s"] > 0


def _run(rate: float, duration: float, records: list[RequestRecord]) -> dict:
    return {"rate": rate, "records": records, "duration_s": duration,
            "summary": {"duration_s": duration, "request_goodput": 0.0, "p99_ttft_ms": 0.0,
                        "p99_tpot_ms": 0.0, "median_tpot_ms": 0.0, "failed": 0}}  # fmt: skip


def _rec(ttft: float, tpot: float) -> RequestRecord:  # 3 output tokens
    return RequestRecord(0, 10, 3, success=True, ttft=ttft, latency=ttft + 2 * tpot, output_tokens=3)  # fmt: skip


def test_analyse_ratios():
    calib = {
        "aggregated": {"median_ttft_ms": 10.0, "median_tpot_ms": 2.0},
        "disaggregated": {"median_ttft_ms": 20.0, "median_tpot_ms": 1.0},
        "slo_ms": {"ttft": 80.0, "tpot": 4.0},
        "ttft_overhead_ms_per_kv_mb": 10.0,
        "inverse_bandwidth_ms_per_mb": 0.5,
    }
    good, slow_tpot, slow_ttft = _rec(0.05, 0.002), _rec(0.05, 0.008), _rec(0.5, 0.001)
    runs = {
        "aggregated": [
            _run(1, 2.0, [good, slow_tpot]),
            _run(2, 2.0, [good, good, slow_tpot, slow_tpot]),
        ],  # fmt: skip
        "disaggregated": [
            _run(1, 2.0, [good, good]),
            _run(2, 2.0, [good, good, good, slow_ttft]),
        ],  # fmt: skip
    }
    out = analyse(runs, calib)
    assert out["best_goodput"] == {"aggregated": 1.0, "disaggregated": 1.5}
    assert out["goodput_ratio"] == 1.5
    assert out["p99_tpot_ms"]["aggregated"] == pytest.approx(8.0)  # 3 of 6 at 8 ms
    assert out["p99_tpot_ms"]["disaggregated"] == pytest.approx(2.0)
    assert out["p99_tpot_ratio"] == pytest.approx(0.25)
    assert out["ttft_overhead_ms_per_kv_mb"] == 10.0
    assert len(out["slo_sensitivity"]) == 9


def test_pdserve_bench_compare_parses():
    from router.launch.cli import build_parser

    args = build_parser().parse_args(["bench", "compare", "--json", "--rates", "1,2"])
    assert args.json and args.rates == "1,2" and callable(args.func)


def test_hop_means_come_from_the_histogram_deltas():
    from bench.compare_cluster import HOPS, hop_means_ms

    before = {f"{h}_{k}": 0.0 for h in HOPS for k in ("sum", "count")}
    after = dict(before, reserve_sum=0.006, reserve_count=4.0, transfer_tail_sum=0.5)
    means = hop_means_ms(before, after)
    assert means["reserve"] == pytest.approx(1.5)
    assert means["transfer_tail"] is None  # a sum without samples is no mean
    assert set(means) == set(HOPS)


def test_analyse_reports_the_ratio_at_twice_the_low_load_ttft():
    calib = {
        "aggregated": {"median_ttft_ms": 10.0, "median_tpot_ms": 2.0},
        "disaggregated": {
            "median_ttft_ms": 10.0,
            "median_tpot_ms": 2.0,
            "hops_ms": {"reserve": 1.0},
        },
        "slo_ms": {"ttft": 40.0, "tpot": 6.0},
        "ttft_overhead_ms_per_kv_mb": 0.0,
        "inverse_bandwidth_ms_per_mb": 0.1,
    }
    fast, slowish = _rec(0.015, 0.002), _rec(0.025, 0.002)  # under / over 2 x 10 ms
    runs = {"aggregated": [_run(1, 1.0, [slowish, slowish])], "disaggregated": [_run(1, 1.0, [fast, slowish])]}  # fmt: skip
    out = analyse(runs, calib)
    assert out["goodput_ratio"] == 1.0  # both meet the 40 ms SLO
    assert out["goodput_ratio_ttft_2x"] == float("inf")  # (a) meets none at 20 ms
    assert out["hops_ms"] == {"disaggregated": {"reserve": 1.0}}
