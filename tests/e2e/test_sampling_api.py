"""The sampling controls through the server: n > 1 with the prompt computed once,
penalties and logit_bias equal to Hugging Face LogitsProcessors, echo with prompt
logprobs equal to HF's log-softmax; aggregated and disaggregated alike."""

from __future__ import annotations

import pytest

from tests.engine.hf_reference import hf_greedy, hf_prompt_logprobs, make_prompts
from tests.engine.test_sampling_controls import CASES, N, reference

from .conftest import API_MODES, MODEL_NAME, client

MODES = API_MODES


def _api_kw(case: dict) -> dict:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if "rep" in case:
        extra["repetition_penalty"] = case["rep"]
    kw = {"extra_body": extra}
    if "presence" in case:
        kw["presence_penalty"] = case["presence"]
    if "frequency" in case:
        kw["frequency_penalty"] = case["frequency"]
    if "bias" in case:
        kw["logit_bias"] = {str(t): b for t, b in case["bias"].items()}
    return kw


@pytest.mark.parametrize("mode", ["aggregated", "tcp"])
def test_penalties_and_logit_bias_equal_hf_processors(mode_routers, tiny_model, mode):
    d = tiny_model("llama")
    prompt = make_prompts([19], seed=67)[0]  # whose greedy output every case changes
    c = client(mode_routers[mode])
    for name in ("all", "repetition", "presence", "frequency", "bias"):
        case = CASES[name]
        for stream in (False, True):
            kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=N, temperature=0, **_api_kw(case))  # fmt: skip
            if stream:
                ids = [t for ch in c.completions.create(stream=True, **kw) for t in ch.choices[0].token_ids]  # fmt: skip
            else:
                ids = c.completions.create(**kw).choices[0].token_ids
            assert ids == reference(d, prompt, **case), (mode, name, stream)


def test_min_p_one_is_greedy(mode_routers, tiny_model):
    prompt = make_prompts([14], seed=81)[0]
    r = client(mode_routers["tcp"]).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=1.0, seed=5,
        extra_body={"min_p": 1.0, "ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert r.choices[0].token_ids == hf_greedy(tiny_model("llama"), [prompt], 12)[0]


@pytest.mark.parametrize("mode", MODES)
def test_n3_one_prefill_shared_in_the_kv_cache(mode_routers, tiny_model, mode):
    c = client(mode_routers[mode])
    prompt = make_prompts([40], seed=82 + MODES.index(mode))[0]  # new to every cache
    kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    greedy = c.completions.create(n=3, temperature=0, **kw)
    want = hf_greedy(tiny_model("llama"), [prompt], 8)[0]
    assert [ch.index for ch in greedy.choices] == [0, 1, 2]
    assert all(ch.token_ids == want for ch in greedy.choices)
    # Choice 0 computed the prompt; the other two read its 2 full blocks from the cache.
    assert greedy.usage.prompt_tokens == 40 and greedy.usage.completion_tokens == 24
    assert greedy.usage.prompt_tokens_details.cached_tokens == 32
    hot = dict(temperature=1.5, seed=9, **kw)
    a, b = c.completions.create(n=3, **hot), c.completions.create(n=3, **hot)
    assert [x.token_ids for x in a.choices] == [x.token_ids for x in b.choices]  # seeded
    assert len({tuple(x.token_ids) for x in a.choices}) == 3  # choice i draws with seed + i
    assert c.completions.create(n=1, **hot).choices[0].token_ids == a.choices[0].token_ids
    chunks = list(c.completions.create(n=3, stream=True, **hot))
    streamed = {i: [] for i in range(3)}
    for ch in chunks:
        streamed[ch.choices[0].index] += ch.choices[0].token_ids
    assert [streamed[i] for i in range(3)] == [x.token_ids for x in a.choices]


@pytest.mark.parametrize("mode", MODES)
def test_echo_prompt_logprobs_equal_hf_log_softmax(mode_routers, tiny_model, mode):
    d = tiny_model("llama")
    prompt = make_prompts([23], seed=90)[0]
    ref = hf_prompt_logprobs(d, prompt)
    c = client(mode_routers[mode])
    for max_tokens, stream in ((0, False), (3, False), (3, True)):
        kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True, logprobs=2)  # fmt: skip
        if stream:
            chunks = list(c.completions.create(stream=True, **kw))
            lps = chunks[0].choices[0].logprobs
            text = "".join(ch.choices[0].text for ch in chunks)
        else:
            r = c.completions.create(**kw)
            lps, text = r.choices[0].logprobs, r.choices[0].text
            assert r.usage.completion_tokens == max_tokens
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert abs(lps.token_logprobs[i] - float(ref[i - 1, prompt[i]])) < 1e-4
            assert len(lps.top_logprobs[i]) >= 2
        assert text.startswith(c.completions.create(**{**kw, "logprobs": None, "max_tokens": 0}).choices[0].text)  # fmt: skip
    text_prompt = "The quick brown fox jumps over the lazy dog"
    r = c.completions.create(model=MODEL_NAME, prompt=text_prompt, max_tokens=2, echo=True)
    assert r.choices[0].text.startswith(text_prompt)
