"""``python -m bench.attention`` stays runnable everywhere: it reports a skip without CUDA
and measures its whole grid with CUDA (``gpu`` marker)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import attention


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_bench_skips_without_cuda(capsys):
    assert attention.main(["--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"skipped": "no CUDA device"}


@pytest.mark.gpu
def test_bench_measures_on_cuda(capsys):
    """On CUDA the benchmark runs its grid: every row measured, a summary last."""
    assert attention.main(["--json", "--iters", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    summary = rows[-1]
    assert summary["bench"] == "summary" and summary["device"]
    assert summary["copy_gbps"] > 0 and summary["min_gbps"] > 0 and summary["ratio"] > 0
    points = [r for r in rows if r["bench"] == "decode_attention"]
    assert [(r["batch"], r["context"]) for r in points] == attention.GRID
    assert all(r["us"] > 0 and r["gbps"] > 0 for r in points)
    assert rows[-2]["bench"] == "split_kv_speedup" and rows[-2]["speedup"] > 0
