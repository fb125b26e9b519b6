"""Tensor parallelism in the engine on CPU (gloo, 2 spawned ranks).

Greedy output with TP=2 equals TP=1 equals HF for tiny Llama, Qwen3, Mixtral and
Qwen2-MoE over a workload with chunked prefill, a prefix hit and preemption, and for a
Qwen2 with one KV head (replicated on both ranks), tied embeddings, a QKV bias and a
vocabulary that does not split evenly. No KV block leaks on the leader.
"""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams
from engine.tiny_model import make_tiny_model
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_tp
from tests.engine.hf_reference import hf_greedy, make_prompts

ARCHS = ["llama", "qwen3", "mixtral", "qwen2_moe"]
KV1 = {"num_key_value_heads": 1, "vocab_size": 509}
MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
# Chunked prefill (16-token budget), preemption (30 blocks of 4 tokens) and a prefix hit
# (the last prompt shares 16 tokens with the second).
ENGINE_ARGS = {"max_num_batched_tokens": 16, "block_size": 4, "num_kv_blocks": 30}


def _workload() -> list[list[int]]:
    base = make_prompts([5, 21, 9, 30, 13, 3], seed=11)
    return [*base, base[1][:17] + [7, 8, 9]]


def _generate_rank(parallel, model_dirs, prompts, out_path):
    results = {}
    for name, d in model_dirs.items():
        llm = LLM(d, parallel=parallel, **ENGINE_ARGS)
        outs = on_leader(llm, lambda llm: llm.generate(prompts, GREEDY))
        if outs is None:
            continue
        e = llm.engine
        results[name] = {
            "tokens": [o.token_ids for o in outs],
            "cached": [o.num_cached_tokens for o in outs],
            "free": e.num_free_blocks,
            "total": e.layout.num_blocks,
            "preemptions": e.scheduler.num_preemptions,
            "heads": [e.layout.num_kv_heads, *e.heads],
        }
    save_on_leader(parallel, out_path, results)


@pytest.fixture(scope="module")
def tp2_run(tiny_model, tmp_path_factory):
    """One TP=2 group generates for every model (process start and joins paid once)."""
    root = tmp_path_factory.mktemp("tp")
    dirs = {arch: str(tiny_model(arch)) for arch in ARCHS}
    dirs["qwen2_kv1"] = str(make_tiny_model("qwen2", root / "qwen2_kv1", overrides=KV1))
    out = root / "tp2.json"
    spawn_tp(_generate_rank, dirs, _workload(), str(out))
    return dirs, json.loads(out.read_text())


@pytest.mark.parametrize("name", [*ARCHS, "qwen2_kv1"])
def test_tensor_parallel_tp2_equals_tp1_equals_hf(tp2_run, name):
    dirs, tp2 = tp2_run
    prompts = _workload()
    llm = LLM(dirs[name], **ENGINE_ARGS)
    tp1 = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    r = tp2[name]
    assert r["tokens"] == tp1 == hf_greedy(dirs[name], prompts, MAX_NEW), name
    assert r["free"] == r["total"] == llm.engine.num_free_blocks
    assert r["preemptions"] > 0 and r["cached"][-1] > 0, r
    if name == "qwen2_kv1":  # one KV head, replicated: both ranks hold head 0
        assert r["heads"] == [1, 0, 1]
    else:  # 2 KV heads: the leader holds head 0 only
        assert r["heads"] == [1, 0, 1] and llm.engine.layout.num_kv_heads == 2
