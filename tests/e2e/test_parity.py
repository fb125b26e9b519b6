"""Greedy output over HTTP (official openai client) equals HF transformers, token for token,
in aggregated mode and disaggregated over shm, tcp and ucx, for a dense and a MoE model."""

from __future__ import annotations

import httpx
import pytest

from engine.tokenizer import Tokenizer
from tests.engine.hf_reference import hf_greedy, make_prompts

from .conftest import MODEL_NAME, client

MODES = ["aggregated", "shm", "tcp", "ucx"]
MAX_NEW = 12
GREEDY = {"max_tokens": MAX_NEW, "temperature": 0.0}
EXTRA = {"ignore_eos": True, "return_token_ids": True}

_routers: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def arch(request) -> str:
    return request.param


def router_for(clusters, arch: str, mode: str):
    if (arch, mode) not in _routers:
        _routers[arch, mode] = clusters(arch).router(mode)
    return _routers[arch, mode]


def routed(rt, path: str, reason: str) -> float:
    needle = f'pdserve_routing_decisions_total{{path="{path}",reason="{reason}"}} '
    for line in httpx.get(rt.url + "/metrics").text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


def expected_route(mode: str) -> tuple[str, str]:
    return ("local", "aggregated") if mode == "aggregated" else ("remote", "cost")


@pytest.mark.parametrize("mode", MODES)
def test_completions_equal_hf(clusters, tiny_model, arch, mode):
    rt = router_for(clusters, arch, mode)
    c = client(rt)
    # Prompts of their own (per mode; each arch has its own cluster): nothing cached yet.
    prompts = make_prompts([23, 40], seed=141 + MODES.index(mode))
    want = hf_greedy(tiny_model(arch), prompts, MAX_NEW)
    tok = Tokenizer.from_dir(tiny_model(arch))
    before = routed(rt, *expected_route(mode))

    full = c.completions.create(model=MODEL_NAME, prompt=prompts[0], **GREEDY, extra_body=EXTRA)
    choice = full.choices[0]
    assert choice.token_ids == want[0]
    assert choice.text == tok.decode(want[0]) and choice.finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (23, MAX_NEW)

    ids, text, usage = [], "", None
    stream = c.completions.create(
        model=MODEL_NAME, prompt=prompts[1], stream=True,
        stream_options={"include_usage": True}, **GREEDY, extra_body=EXTRA,
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices:
            ids += chunk.choices[0].token_ids
            text += chunk.choices[0].text
        else:
            usage = chunk.usage
    assert ids == want[1] and text == tok.decode(want[1])
    assert usage.completion_tokens == MAX_NEW and usage.prompt_tokens == 40
    assert usage.prompt_tokens_details.cached_tokens == 0
    again = c.completions.create(model=MODEL_NAME, prompt=prompts[1], **GREEDY, extra_body=EXTRA)
    assert again.choices[0].token_ids == want[1]
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # 2 full blocks of 16
    assert routed(rt, *expected_route(mode)) == before + 3


@pytest.mark.parametrize("mode", ["aggregated", "shm"])
@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_chat_equals_hf(clusters, tiny_model, arch, mode, stream):
    rt = router_for(clusters, arch, mode)
    tok = Tokenizer.from_dir(tiny_model(arch))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Name a colour ({arch}, {mode})."},
    ]
    prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    want = hf_greedy(tiny_model(arch), [prompt], MAX_NEW)[0]
    c = client(rt)
    kwargs = dict(model=MODEL_NAME, messages=messages, **GREEDY, extra_body=EXTRA)
    if not stream:
        r = c.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        assert (msg.role, r.choices[0].token_ids) == ("assistant", want)
        assert msg.content == tok.decode(want) and r.usage.prompt_tokens == len(prompt)
        return
    ids, text, roles = [], "", []
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        text += delta.content or ""
        ids += chunk.choices[0].token_ids
    assert ids == want and text == tok.decode(want) and roles[0] == "assistant"


def test_seeded_sampling_is_the_same_remote_and_local(clusters, tiny_model):
    """A seeded request samples the same tokens whether the prefill worker draws its first
    token (disaggregated) or the decode worker draws them all (aggregated)."""
    prompt = make_prompts([37], seed=43)[0]
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 1.0}
    got = {}
    for mode in ("aggregated", "tcp"):
        rt = router_for(clusters, "llama", mode)
        before = routed(rt, *expected_route(mode))
        r = client(rt).completions.create(**body, seed=99, extra_body=EXTRA)
        assert routed(rt, *expected_route(mode)) == before + 1  # took the path we mean
        got[mode] = r.choices[0].token_ids
    assert got["aggregated"] == got["tcp"]
    assert got["tcp"] != hf_greedy(tiny_model("llama"), [prompt], MAX_NEW)[0]  # sampled
