"""A quantized KV cache under tensor parallelism (gloo, 2 spawned ranks): each rank
quantizes its own KV heads with per-head scales, so TP=2 needs no scale exchange and
agrees with TP=1's quantized cache; no KV block leaks on the leader."""

from __future__ import annotations

import json

from engine import LLM, SamplingParams
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_tp
from tests.engine.hf_reference import make_prompts
from tests.engine.quant_kv_model import make_decisive_model

PROMPTS = make_prompts([5, 21, 9, 30, 13, 3, 40, 17], seed=11)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ARGS = {"kv_cache_dtype": "fp8_e4m3", "max_num_batched_tokens": 16, "block_size": 4}


def _rank(parallel, model, out_path):
    llm = LLM(model, parallel=parallel, **ARGS)
    outs = on_leader(llm, lambda llm: [o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
    if outs is None:
        return
    e = llm.engine
    result = {"tokens": outs, "free": e.num_free_blocks, "total": e.layout.num_blocks,
              "heads": list(e.heads), "row": e.kv_caches[0][0].shape[-1]}  # fmt: skip
    save_on_leader(parallel, out_path, result)


def test_quant_kv_tp2_agrees_with_tp1(tmp_path):
    model = str(make_decisive_model(tmp_path / "llama"))
    out = tmp_path / "tp2.json"
    spawn_tp(_rank, model, str(out))
    tp2 = json.loads(out.read_text())
    tp1 = [o.token_ids for o in LLM(model, **ARGS).generate(PROMPTS, GREEDY)]
    assert tp2["heads"] == [0, 1] and tp2["row"] == 16 + 2  # one fp8 head row + its scale
    assert tp2["free"] == tp2["total"]
    assert sum(a == b for a, b in zip(tp2["tokens"], tp1, strict=True)) >= 7  # of 8
