"""Expert parallelism over NCCL: 2 spawned ranks, one CUDA device each (expert traffic on
NCCL, the step broadcast on gloo). Greedy output with EP=2 equals EP=1 on one device, in
float32, for the tiny MoE models, and every KV block is free afterwards."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_ep
from tests.engine.hf_reference import make_prompts

from .conftest import DEVICE, device, needs_two_devices

pytestmark = [pytest.mark.gpu, needs_two_devices]

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
ENGINE = {"dtype": "float32", "num_kv_blocks": 48, "max_num_batched_tokens": 32}


def _rank(ep, model_dirs: dict[str, str], prompts, out_path: str) -> None:
    results = {}
    for arch, d in model_dirs.items():
        llm = LLM(d, ep=ep, device=device(ep.rank), **ENGINE)
        outs = on_leader(llm, lambda llm: llm.generate(prompts, GREEDY))
        if outs is not None:
            free = (llm.engine.num_free_blocks, llm.engine.layout.num_blocks)
            results[arch] = {"tokens": [o.token_ids for o in outs], "free": free}
    save_on_leader(ep, out_path, results)


def test_ep2_over_nccl_equals_ep1(tiny_model, tmp_path):
    dirs = {arch: str(tiny_model(arch)) for arch in ("mixtral", "qwen3_moe")}
    prompts = make_prompts([5, 21, 9, 30, 13, 3], seed=221)
    out = tmp_path / "ep2.json"
    spawn_ep(_rank, dirs, prompts, str(out), device=DEVICE)
    ep2 = json.loads(out.read_text())
    for arch, d in dirs.items():
        ep1 = [o.token_ids for o in LLM(d, device=device(0), **ENGINE).generate(prompts, GREEDY)]
        assert ep2[arch]["tokens"] == ep1, arch
        assert ep2[arch]["free"][0] == ep2[arch]["free"][1], ep2[arch]["free"]
