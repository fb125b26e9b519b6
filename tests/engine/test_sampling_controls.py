"""Penalties, logit_bias, min_p and prompt logprobs equal Hugging Face's on the same
checkpoint; one request's controls never leak into another's row."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from engine import LLM, SamplingParams
from tests.engine.hf_reference import (
    hf_greedy,
    hf_greedy_with,
    hf_next_logits,
    hf_prompt_logprobs,
    make_prompts,
)

N = 24


class OpenAIPenalties(LogitsProcessor):
    """The OpenAI API's definition over the *generated* tokens only:
    ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))  # fmt: skip
        return scores - counts * self.frequency - (counts > 0) * self.presence


def bias_processor(bias: dict[int, float]) -> SequenceBiasLogitsProcessor:
    return SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])


def reference(d, prompt, *, bias=None, rep=1.0, presence=0.0, frequency=0.0) -> list[int]:
    procs = []
    if bias:
        procs.append(bias_processor(bias))
    if rep != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(rep))
    if presence or frequency:
        procs.append(OpenAIPenalties(len(prompt), presence, frequency))
    return hf_greedy_with(d, prompt, N, procs)


def params(**kw) -> SamplingParams:
    bias = kw.pop("bias", None) or {}
    return SamplingParams(
        max_tokens=N, temperature=0.0, ignore_eos=True, logit_bias=tuple(bias.items()), **kw
    )


CASES = {
    "repetition": dict(rep=1.8),
    "repetition_below_one": dict(rep=0.6),
    "presence": dict(presence=1.5),
    "frequency": dict(frequency=0.9),
    "presence_negative": dict(presence=-1.2),
    "bias": dict(bias={388: -100.0, 426: -30.0, 300: 4.5}),  # 388, 426: greedy picks
    "all": dict(bias={17: 3.0, 99: 2.0}, rep=1.3, presence=0.7, frequency=0.4),
}


def _engine_kw(case: dict) -> dict:
    return {
        "repetition_penalty": case.get("rep", 1.0),
        "presence_penalty": case.get("presence", 0.0),
        "frequency_penalty": case.get("frequency", 0.0),
        "bias": case.get("bias"),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_controls_equal_hf_logits_processors(llama_llm, llama_dir, name):
    case = CASES[name]
    prompt = make_prompts([19], seed=67)[0]  # one whose greedy output every case changes
    want = reference(llama_dir, prompt, **case)
    assert want != hf_greedy(llama_dir, [prompt], N)[0], "the case must change the greedy output"
    got = llama_llm.generate([prompt], params(**_engine_kw(case)))[0].token_ids
    assert got == want
    assert llama_llm.engine.num_free_blocks == llama_llm.engine.layout.num_blocks


def test_controls_stay_in_their_row_of_a_batch(llama_llm, llama_dir):
    prompts = make_prompts([12, 30, 7, 21], seed=62)
    cases = [CASES["all"], {}, CASES["frequency"], CASES["bias"]]
    plist = [params(**_engine_kw(c)) for c in cases]
    got = [o.token_ids for o in llama_llm.generate(prompts, plist)]
    assert got == [reference(llama_dir, p, **c) for p, c in zip(prompts, cases, strict=True)]
    llama_llm.generate([[5, 6]], SamplingParams(max_tokens=1))  # its step drops the finished' state
    assert len(llama_llm.engine.runner.sampler_states) == 0


def test_controls_survive_chunked_prefill_and_preemption(llama_dir):
    # 6 blocks of 16 tokens for three 30-token requests growing to 54: preemption happens.
    small = LLM(llama_dir, num_kv_blocks=8, max_num_batched_tokens=16)
    prompts = make_prompts([30, 30, 30], seed=63)
    case = CASES["all"]
    got = [o.token_ids for o in small.generate(prompts, params(**_engine_kw(case)))]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == [reference(llama_dir, p, **case) for p in prompts]


def test_logit_bias_plus_100_forces_a_token(llama_llm):
    out = llama_llm.generate([[5, 6, 7]], params(bias={123: 100.0}))[0]
    assert out.token_ids == [123] * N


def test_min_p_one_is_greedy_and_min_p_bounds_every_draw(llama_llm, llama_dir):
    prompt = make_prompts([15], seed=64)[0]
    hot = dict(max_tokens=16, temperature=1.5, ignore_eos=True)
    ones = llama_llm.generate([prompt], SamplingParams(min_p=1.0, seed=3, **hot))[0].token_ids
    assert ones == hf_greedy(llama_dir, [prompt], 16)[0]
    min_p = 0.3

    def violations(tokens: list[int]) -> int:
        bad = 0
        for i, t in enumerate(tokens):
            probs = torch.softmax(hf_next_logits(llama_dir, prompt + tokens[:i]) / 1.5, dim=-1)
            bad += bool(probs[t] < min_p * probs.max() - 1e-6)
        return bad

    for seed in range(4):
        sp = SamplingParams(min_p=min_p, seed=seed, **hot)
        got = llama_llm.generate([prompt], sp)[0].token_ids
        assert violations(got) == 0
    # Without min_p the same draws break the bound: the check above can fail.
    free = [
        llama_llm.generate([prompt], SamplingParams(seed=s, **hot))[0].token_ids for s in range(4)
    ]
    assert sum(violations(t) for t in free) > 0


@pytest.mark.parametrize("chunk", [2048, 8])
def test_prompt_logprobs_equal_hf_log_softmax(llama_dir, chunk):
    llm = LLM(llama_dir, max_num_batched_tokens=chunk)
    prompt = make_prompts([37], seed=65)[0]
    ref = hf_prompt_logprobs(llama_dir, prompt)
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    for _ in range(2):  # the second run's prefix is cached: it must be scored anyway
        out = llm.generate([prompt], sp)[0]
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) - 1
        for i, entry in enumerate(lps):
            token = prompt[i + 1]
            assert abs(entry[token] - float(ref[i, token])) < 1e-4
            top_v, top_i = torch.topk(ref[i], 3)
            for v, t in zip(top_v.tolist(), top_i.tolist(), strict=True):
                assert abs(entry[t] - v) < 1e-4
        assert out.num_cached_tokens == 0
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks


def test_bad_controls_refused_with_the_field_named(llama_llm):
    for kw, needle in [
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be in [0.01, 10]"),
        # Regression (the OpenAPI fuzzer): 5e-324 divided the logits to inf, a 502.
        (dict(repetition_penalty=5e-324), "repetition_penalty must be in [0.01, 10]"),
        (dict(min_p=1.5), "min_p must be in [0, 1]"),
        (dict(logit_bias=((5, 101.0),)), "logit_bias values must be in [-100, 100]"),
        (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match=r"logit_bias names token id 600"):
        llama_llm.engine.add_request("bad-bias", [5, 6], SamplingParams(logit_bias=((600, 1.0),)))
    assert llama_llm.engine.num_free_blocks == llama_llm.engine.layout.num_blocks
