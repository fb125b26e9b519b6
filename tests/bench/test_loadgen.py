"""The load generator against a fake OpenAI server: streams, arrivals, concurrency cap,
failures, trace replay with cached tokens, the CLI with --json and --plot."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from bench.serve.client import CHAT, ClientConfig, api_url
from bench.serve.datasets import BenchRequest, mooncake_requests, random_requests
from bench.serve.runner import RunConfig, arrival_offsets, run
from tests.bench.fake_server import FakeServer


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


LATE_S = 2.0
"""How late a send may start after its scheduled time: the event loop of a busy 2-core
machine. A send is never early (the lower bounds), so the schedule is checked exactly
there."""


def bench(fake, requests, endpoint="/v1/completions", **cfg):
    client = ClientConfig(fake.url, "fake-model", endpoint, ignore_eos=True)
    return asyncio.run(run(client, RunConfig(progress=False, **cfg), requests))


def test_arrival_offsets():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    poisson = arrival_offsets(4001, rate=50.0, seed=1)
    gaps = np.diff(poisson)
    assert poisson[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / 50) < 0.002  # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08  # exponential: cv 1
    even = np.diff(arrival_offsets(4001, rate=50.0, burstiness=4.0, seed=1))
    assert abs(even.mean() - 1 / 50) < 0.002 and abs(even.std() / even.mean() - 0.5) < 0.05
    assert arrival_offsets(10, 3.0, seed=2) == arrival_offsets(10, 3.0, seed=2)


def test_api_url_accepts_v1_suffix():
    assert api_url("http://h:1/v1/", "/v1/models") == "http://h:1/v1/models"
    assert api_url("http://h:1", "/v1/completions") == "http://h:1/v1/completions"


def test_random_workload_metrics(fake):
    reqs = random_requests(12, 40, 10, range_ratio=0.5, vocab_size=100, seed=0)
    result = bench(fake, reqs, goodput={"ttft": 10_000, "tpot": 10_000}, warmup=2)
    s = result.summary
    assert (s["completed"], s["failed"]) == (12, 0)
    assert s["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert s["total_input_tokens"] == sum(r.prompt_len for r in reqs)
    assert s["good_requests"] == 12 and s["request_goodput"] == s["request_throughput"]
    assert 20 <= s["median_ttft_ms"] < 1000  # the fake's first chunk comes after 20 ms
    assert 4 <= s["median_tpot_ms"] < 200 and 4 <= s["median_itl_ms"] < 200
    for r, req in zip(result.records, reqs, strict=True):
        assert r.success and r.output_tokens == req.output_len
        assert len(r.itl) == req.output_len - 1  # every chunk, the empty first one too
    bodies = fake.state.bodies
    assert len(bodies) == 14  # 2 warmup
    warm = sorted(b["prompt"] for b in bodies[:2])  # warmup: reversed prompts, sent at once
    assert warm == sorted(r.prompt[::-1] for r in reqs[:2])
    assert all(b["ignore_eos"] and b["stream_options"]["include_usage"] for b in bodies)
    assert all(b["temperature"] == 0.0 for b in bodies)


def test_request_rate_spreads_sends(fake):
    reqs = random_requests(8, 16, 2, vocab_size=50, seed=0)
    result = bench(fake, reqs, request_rate=40.0, seed=3)
    starts = [r.start for r in result.records]
    for got, want in zip(starts, arrival_offsets(8, 40.0, seed=3), strict=True):
        assert want - 0.001 <= got <= want + LATE_S


def test_max_concurrency_caps_inflight(fake):
    reqs = random_requests(8, 16, 8, vocab_size=50, seed=0)
    result = bench(fake, reqs, max_concurrency=2)
    assert result.summary["completed"] == 8 and fake.state.max_inflight == 2


def test_failures_are_counted_not_raised(fake):
    fake.state.fail_max_tokens = 7
    reqs = [BenchRequest([1, 2, 3], 3, n) for n in (5, 7, 6, 7)]
    result = bench(fake, reqs, goodput={"e2el": 60_000})
    s = result.summary
    assert (s["completed"], s["failed"], s["good_requests"]) == (2, 2, 2)
    assert [r.success for r in result.records] == [True, False, True, False]
    assert result.records[1].error.startswith("HTTP 500") and "injected" in result.records[1].error


def test_chat_endpoint_text_prompts(fake):
    reqs = [BenchRequest("hello there", 2, 3), BenchRequest("hi", 1, 1)]
    result = bench(fake, reqs, endpoint=CHAT)
    assert result.summary["completed"] == 2
    sent = sorted(b["messages"][0]["content"] for b in fake.state.bodies)
    assert sent == ["hello there", "hi"]
    assert all(b["messages"][0]["role"] == "user" and "prompt" not in b for b in fake.state.bodies)
    assert [r.output_tokens for r in result.records] == [3, 1]
    assert result.records[1].tpot is None and result.records[1].itl == []


def test_trace_replay_timestamps_and_cache_hits(fake, small_trace):
    reqs = mooncake_requests(small_trace(16, seed=2), seed=0, speedup=4.0, length_scale=1 / 16)
    assert any(r.arrival_s > 0 for r in reqs)
    result = bench(fake, reqs, request_rate=0.001)  # ignored: the trace's timestamps rule
    assert result.summary["completed"] == 16
    for r, req in zip(result.records, reqs, strict=True):
        assert req.arrival_s - 0.001 <= r.start <= req.arrival_s + LATE_S
    st = fake.state
    assert st.cached_tokens > 0
    assert result.summary["prefix_cache_hit_rate"] == st.cached_tokens / st.prompt_tokens
    assert sum(r.cached_tokens for r in result.records) == st.cached_tokens


def test_cli_json_and_plots(fake, tmp_path, tiny_model, capsys):
    from bench.serve.cli import main

    out = tmp_path / "run.json"
    argv = ["--base-url", fake.url + "/v1", "--num-prompts", "6", "--random-input-len", "32",
            "--random-output-len", "4", "--request-rate", "inf", "--goodput", "ttft:5000",
            "tpot:5000", "--json", str(out), "--plot", str(tmp_path / "plots"),
            "--tokenizer", str(tiny_model("llama")), "--disable-tqdm", "--ignore-eos"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "Request goodput (req/s)" in text
    assert "P99 TPOT (ms):" in text and "Prefix cache hit rate (%):" in text
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 6 and len(data["records"]) == 6
    assert data["config"]["model"] == "fake-model" and data["config"]["request_rate"] == "inf"
    assert {"ttft", "itl", "latency", "tpot", "output_tokens"} <= set(data["records"][0])
    for name in ("latency_cdf.png", "ttft_over_time.png", "tpot_over_time.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:-4] + ["--goodput", "ttft"]) == 2  # a bad SLO names the fix
    assert "use NAME:MILLISECONDS" in capsys.readouterr().out
