"""Sampler: seeds reproduce, top-k/top-p, stop tokens, min_tokens, logprobs."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import apply_top_k_top_p
from tests.engine.hf_reference import hf_greedy, make_prompts


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"))


def _gen(llm, prompts, **kw):
    return [
        o.token_ids
        for o in llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, **kw))
    ]


def test_seed_reproduces_regardless_of_batch(llm):
    prompts = make_prompts([7, 19, 30], seed=5)
    alone = _gen(llm, prompts[1:2], temperature=1.0, seed=42)
    batched = _gen(llm, prompts, temperature=1.0, seed=42)
    assert batched[1] == alone[0]
    assert _gen(llm, prompts[1:2], temperature=1.0, seed=43) != alone
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_model, llm):
    prompts = make_prompts([9, 21], seed=6)
    expected = hf_greedy(tiny_model("llama"), prompts, 12)
    assert _gen(llm, prompts, temperature=1.0, top_k=1, seed=1) == expected
    assert _gen(llm, prompts, temperature=0.8, top_p=1e-6, seed=1) == expected


def test_top_k_top_p_masks():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [True, False, False, True]
    # softmax ~ [.09, .64, .24, .03]: top_p=0.7 keeps the two that reach 0.7
    assert torch.isinf(apply_top_k_top_p(logits, None, 0.7)).tolist() == [True, False, False, True]


def test_stop_token_ids_end_the_output_with_the_stop_token(llm):
    prompt = make_prompts([15], seed=7)
    greedy = _gen(llm, prompt, temperature=0.0)[0]
    stop = greedy[4]
    first = greedy.index(stop)
    (out,) = llm.generate(
        prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    )
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop"


def test_min_tokens_suppresses_stop_tokens(llm):
    prompt = make_prompts([15], seed=7)
    greedy = _gen(llm, prompt, temperature=0.0)[0]
    params = SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=[greedy[0]], min_tokens=3
    )
    (out,) = llm.generate(prompt, params)
    assert out.token_ids[0] != greedy[0]
    assert greedy[0] not in out.token_ids[:3]


def test_logprobs_match_hf(tiny_model, llm):
    from tests.engine.hf_reference import _hf_model

    prompt = make_prompts([11], seed=8)[0]
    (out,) = llm.generate(
        [prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=3, ignore_eos=True)
    )
    model = _hf_model(str(tiny_model("llama")))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for step, (token, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert token in lps and len(lps) == 3  # greedy token is also the top-1
        assert set(lps) == set(torch.topk(row, 3).indices.tolist())
        for tid, lp in lps.items():
            assert lp == pytest.approx(float(row[tid]), abs=1e-4)


def test_prefill_rate_is_measured(tiny_model):
    llm = LLM(tiny_model("llama"))
    assert llm.engine.prefill_rate.tokens_per_s == 0.0  # nothing measured yet
    _gen(llm, make_prompts([40, 30], seed=9), temperature=0.0)
    assert llm.engine.prefill_rate.tokens_per_s > 0
