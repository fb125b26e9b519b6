"""``python -m bench.attention`` stays runnable everywhere (it skips without CUDA)."""

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
