"""`pdserve bench serve` against the real service: a 1 prefill + 1 decode tiny-Llama cluster
on local Ray (the tests/e2e fixtures), 8 trace-replay requests with shared prefixes."""

from __future__ import annotations

import json

from bench.serve.datasets import mooncake_requests
from tests.e2e.conftest import MODEL_NAME, _no_leaked_blocks, clusters, ray_session  # noqa: F401


def test_bench_serve_against_the_service(clusters, small_trace, tmp_path, capsys):  # noqa: F811
    from bench.serve.cli import main

    cluster = clusters("llama")
    rt = cluster.router("shm")
    trace = small_trace(8, seed=3)
    expected = mooncake_requests(trace, seed=0, speedup=2.0, length_scale=1 / 16)
    out = tmp_path / "run.json"
    argv = ["--base-url", rt.url, "--model", MODEL_NAME, "--dataset", "mooncake-trace",
            "--dataset-path", str(trace), "--trace-speedup", "2", "--length-scale", "0.0625",
            "--tokenizer", str(cluster.model), "--ignore-eos", "--goodput", "ttft:60000",
            "--warmup", "1", "--disable-tqdm", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    data = json.loads(out.read_text())
    s, records = data["summary"], data["records"]
    assert (s["completed"], s["failed"], s["good_requests"]) == (8, 0, 8)
    assert [r["output_tokens"] for r in records] == [r.output_len for r in expected]
    assert [r["server_prompt_tokens"] for r in records] == [r.prompt_len for r in expected]
    assert all(0 < r["ttft"] <= r["latency"] for r in records)
    assert all(len(r["itl"]) >= 1 for r in records if r["output_tokens"] > 1)
    assert s["prefix_cache_hit_rate"] > 0  # shared hash ids -> shared blocks -> cache hits
    assert s["total_input_tokens"] == sum(r.prompt_len for r in expected)
