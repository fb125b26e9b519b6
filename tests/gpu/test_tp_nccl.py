"""Tensor parallelism over NCCL: 2 spawned ranks, one CUDA device each (all-reduce and the
logits gather on NCCL, the step broadcast on gloo). Greedy output with TP=2 equals TP=1 on
one device, in float32, for a dense and an MoE tiny model, and every KV block is free."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_tp
from tests.engine.hf_reference import make_prompts

from .conftest import DEVICE, device, needs_two_devices

pytestmark = [pytest.mark.gpu, needs_two_devices]

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE = {"dtype": "float32", "num_kv_blocks": 48, "max_num_batched_tokens": 32}


def _rank(parallel, model_dirs: dict[str, str], prompts, out_path: str) -> None:
    results = {}
    for arch, d in model_dirs.items():
        llm = LLM(d, parallel=parallel, device=device(parallel.rank), **ENGINE)
        outs = on_leader(llm, lambda llm: llm.generate(prompts, GREEDY))
        if outs is not None:
            free = (llm.engine.num_free_blocks, llm.engine.layout.num_blocks)
            results[arch] = {"tokens": [o.token_ids for o in outs], "free": free}
    save_on_leader(parallel, out_path, results)


def test_tensor_parallel_tp2_over_nccl_equals_tp1(tiny_model, tmp_path):
    dirs = {arch: str(tiny_model(arch)) for arch in ("llama", "qwen2_moe")}
    prompts = make_prompts([5, 21, 9, 30, 13, 3], seed=223)
    out = tmp_path / "tp2.json"
    spawn_tp(_rank, dirs, prompts, str(out), device=DEVICE)
    tp2 = json.loads(out.read_text())
    for arch, d in dirs.items():
        tp1 = [o.token_ids for o in LLM(d, device=device(0), **ENGINE).generate(prompts, GREEDY)]
        assert tp2[arch]["tokens"] == tp1, arch
        assert tp2[arch]["free"][0] == tp2[arch]["free"][1], tp2[arch]["free"]
