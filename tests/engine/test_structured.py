"""Structured output in the engine: the tiny random model's free output is noise, so every
output that parses and validates proves the grammar mask was applied; a prefill engine
samples the first token under the grammar and a decode engine continues from it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.grammar import GrammarBackend, GrammarError, fill_masks
from engine.sampler import sample
from engine.sampler_state import Controls
from engine.sampling_params import StructuredOutput
from engine.scheduler_output import SampledToken
from tests.engine.hf_reference import make_prompts
from tests.engine.test_disagg_hooks import _disagg

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


def json_params(**kw) -> SamplingParams:
    so = StructuredOutput("json", json.dumps(SCHEMA))
    return SamplingParams(max_tokens=kw.pop("max_tokens", 160), structured=so, **kw)


def test_json_schema_output_validates_greedy_and_sampled(llama_llm):
    prompts = make_prompts([5, 17, 33], seed=71)
    free = llama_llm.generate(prompts[:1], SamplingParams(max_tokens=40, temperature=0.0))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)  # without the mask: noise
    outs = llama_llm.generate(prompts, json_params(temperature=0.0))
    outs += llama_llm.generate(prompts, [json_params(temperature=1.0, seed=s) for s in range(3)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.token_ids[-1] in llama_llm.engine.spec.eos_token_ids
    assert llama_llm.engine.num_free_blocks == llama_llm.engine.layout.num_blocks


def test_regex_choice_and_json_object(llama_llm):
    prompt = make_prompts([9], seed=72)[0]
    kinds = {
        "regex": (r"[a-z]{2,4}-[0-9]{3}", lambda t: re.fullmatch(r"[a-z]{2,4}-[0-9]{3}", t)),
        "choice": (
            json.dumps(["alpha", "beta", "gamma"]),
            lambda t: t in ("alpha", "beta", "gamma"),
        ),  # fmt: skip
        "json_object": ("", lambda t: isinstance(json.loads(t), dict)),
    }
    for kind, (spec, ok) in kinds.items():
        # Any JSON object has unbounded strings, which a noise model rarely closes within
        # a budget: greedy on a prompt whose (deterministic) output does close them.
        for seed in range(3) if kind != "json_object" else (None,):
            temp = 0.0 if seed is None else 1.0
            so = StructuredOutput(kind, spec)
            sp = SamplingParams(max_tokens=200, temperature=temp, seed=seed, structured=so)
            free_prompt = [43, 411, 252, 92, 296, 249]  # closes a 50-token object greedily
            out = llama_llm.generate([prompt if seed is not None else free_prompt], sp)[0]
            assert out.finish_reason == "stop" and ok(out.text), (kind, out.text)


def test_grammar_compiled_once_per_spec(llama_llm):
    before = llama_llm.engine.grammars.num_compiled
    llama_llm.generate(make_prompts([6, 7], seed=73), json_params(max_tokens=8))
    llama_llm.generate(make_prompts([8], seed=74), json_params(max_tokens=8))
    assert llama_llm.engine.grammars.num_compiled - before <= 1  # SCHEMA may be cached already


@pytest.mark.parametrize(
    "kind,spec,needle",
    [
        ("json", '{"type": "strng"}', "Invalid type: strng"),
        ("json", "{not json", "not valid JSON"),
        ("regex", "[a-", "unclosed character class"),
        ("choice", "[]", "non-empty list"),
        ("grammar", "start: nothing_defined", "unknown name"),
    ],
)
def test_bad_specs_refused_before_the_batch(llama_llm, kind, spec, needle):
    sp = SamplingParams(structured=StructuredOutput(kind, spec))
    with pytest.raises(GrammarError, match=re.escape(needle)):
        llama_llm.engine.add_request(f"bad-{kind}", [5, 6, 7], sp)
    with pytest.raises(GrammarError):
        llama_llm.engine.reserve(f"bad-r-{kind}", [5, 6, 7], sp)
    assert llama_llm.engine.num_free_blocks == llama_llm.engine.layout.num_blocks
    assert not llama_llm.engine.has_unfinished_requests()


def test_disaggregated_first_token_under_grammar_decode_continues(llama_dir):
    prompts = make_prompts([20, 37], seed=75)
    params = json_params(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)
    agg = [o.token_ids for o in LLM(llama_dir).generate(prompts, params)]
    prefill = LLM(llama_dir, max_num_batched_tokens=16).engine
    decode = LLM(llama_dir).engine
    got, _ = _disagg(prefill, decode, prompts, params)
    assert got == agg
    for ids in got:
        jsonschema.validate(json.loads(_text(llama_dir, ids)), SCHEMA)


def _text(d, ids) -> str:
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(d).decode(ids)


def test_grammar_row_with_nothing_allowed_fails_alone(llama_dir):
    backend = GrammarBackend(llama_dir, 512, (0,))
    so = StructuredOutput("choice", json.dumps(["ab"]))
    matcher = backend.matcher(so)
    allowed = fill_masks(backend, [matcher])
    logits = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    ok = tuple(t for t in range(512) if (int(allowed[0, t // 32]) >> (t % 32)) & 1)
    assert 0 < len(ok) < 512
    ctl = Controls(grammar_rows=(0,), masks=_done(allowed), failed={})
    greedy = SamplingParams(temperature=0.0)
    # Row 0: suppression (min_tokens) takes away every token the grammar allows.
    got = sample(logits.clone(), [greedy, greedy], [1, 2], [ok, ()], torch.Generator(), ctl)
    assert "no token is allowed" in got[0].reason
    assert got[1] == SampledToken(int(logits[1].argmax()))


def _done(value):
    from concurrent.futures import Future

    fut = Future()
    fut.set_result(value)
    return fut
