"""The sampling extensions under expert parallelism (gloo, 2 spawned ranks): grammar
masks, penalties, logit_bias and prompt logprobs give the same outputs with EP=2 as with
EP=1. Only the leader samples; followers receive each step without sampler state, and a
request scoring its prompt is homed on the leader (which has its hidden rows)."""

from __future__ import annotations

import json

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutput
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_ep
from tests.engine.hf_reference import make_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "k": {"enum": ["a", "b"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["k", "n"],
    "additionalProperties": False,
}
ARGS = {"max_num_batched_tokens": 16, "block_size": 4, "num_kv_blocks": 64}


def _params() -> list[SamplingParams]:
    so = StructuredOutput("json", json.dumps(SCHEMA))
    base = dict(max_tokens=40, temperature=0.0)
    return [
        SamplingParams(structured=so, **base),
        SamplingParams(
            repetition_penalty=1.5,
            presence_penalty=1.0,
            logit_bias=((7, 5.0),),
            ignore_eos=True,
            **base,
        ),  # fmt: skip
        SamplingParams(prompt_logprobs=2, ignore_eos=True, **base),
        SamplingParams(structured=so, temperature=1.0, seed=3, max_tokens=40),
        SamplingParams(frequency_penalty=1.5, ignore_eos=True, **base),
    ]


def _outputs(llm: LLM, prompts) -> list[dict]:
    outs = llm.generate(prompts, _params())
    return [{"tokens": o.token_ids, "prompt_logprobs": o.prompt_logprobs} for o in outs]


def _rank(ep, model_dir, prompts, out_path):
    llm = LLM(model_dir, ep=ep, **ARGS)
    got = on_leader(llm, lambda llm: _outputs(llm, prompts))
    if got is None:
        return
    free = llm.engine.num_free_blocks == llm.engine.layout.num_blocks
    save_on_leader(ep, out_path, {"outs": got, "free": free})


def test_ep2_controls_equal_ep1(tiny_model, tmp_path):
    d = str(tiny_model("qwen3_moe"))
    prompts = make_prompts([9, 21, 13, 5, 30], seed=77)
    out = tmp_path / "ep2.json"
    spawn_ep(_rank, d, prompts, str(out))
    ep2 = json.loads(out.read_text())
    ep1 = json.loads(json.dumps(_outputs(LLM(d, **ARGS), prompts)))  # the same JSON round trip
    assert ep2["free"]
    assert [o["tokens"] for o in ep2["outs"]] == [o["tokens"] for o in ep1]
    for a, b in zip(ep2["outs"][2]["prompt_logprobs"], ep1[2]["prompt_logprobs"], strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert ep1[2]["prompt_logprobs"] and len(ep1[2]["prompt_logprobs"]) == len(prompts[2]) - 1
