"""TP=2 with quantized checkpoints equals TP=1 (greedy): each rank reads its slice of
the 8-bit weight and of its scales (packed INT8 columns / 4, group scales / group size,
a per-tensor scale whole) on 2 spawned gloo ranks.

FP8 W8A8 dynamic is left out: a row-parallel layer's ranks each quantize their own
columns of the activations, with their own per-token scale (as vLLM does), so TP=2 is
not bit-equal to TP=1 there by design."""

from __future__ import annotations

import json

from engine import LLM, SamplingParams
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_tp
from tests.engine.hf_reference import make_prompts
from tests.quant.checkpoints import build

PRESETS = ["int8", "int8-group", "fp8-tensor", "fp8"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = make_prompts([5, 21, 9, 30], seed=41)


def _generate_rank(parallel, model_dirs, out_path):
    results = {}
    for name, d in model_dirs.items():
        llm = LLM(d, parallel=parallel, max_num_batched_tokens=16)
        outs = on_leader(llm, lambda llm: llm.generate(PROMPTS, GREEDY))
        if outs is not None:
            free = llm.engine.num_free_blocks == llm.engine.layout.num_blocks
            results[name] = {"tokens": [o.token_ids for o in outs], "free": free}
    save_on_leader(parallel, out_path, results)


def test_quant_tp2_equals_tp1(tmp_path):
    # qwen2 adds a QKV bias and tied embeddings; 128 columns keep INT8 groups whole per rank
    dirs = {p: str(build(tmp_path, "llama", p)) for p in PRESETS}
    dirs["qwen2-int8"] = str(build(tmp_path, "qwen2", "int8"))
    out = tmp_path / "tp2.json"
    spawn_tp(_generate_rank, dirs, str(out))
    tp2 = json.loads(out.read_text())
    for name, d in dirs.items():
        tp1 = [o.token_ids for o in LLM(d, max_num_batched_tokens=16).generate(PROMPTS, GREEDY)]
        assert tp2[name]["tokens"] == tp1, name
        assert tp2[name]["free"], name
