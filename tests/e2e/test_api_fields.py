"""Every field of the OpenAI completions and chat request schemas (as the installed
``openai`` package declares them) is honoured or refused, never silently dropped.

Each field has an entry: ``honoured`` (a request with it differs from one without it
as the field says it should), ``noop`` (accepted: OpenAI clients send it and it changes
nothing; the output equals the baseline's) or ``refused`` (400 whose ``param`` is the
field). A field the openai package adds later has no entry, and the test fails until
someone decides which it is. The other way round, every field pdserve's request models
accept is an OpenAI field or a documented extension.
"""

from __future__ import annotations

import httpx
import pytest
from openai.types import completion_create_params as cp
from openai.types.chat import completion_create_params as ccp

from router.protocol import ChatCompletionRequest, CompletionRequest
from tests.engine.hf_reference import make_prompts

from .conftest import MODEL_NAME

PROMPT = make_prompts([19], seed=67)[0]  # whose greedy output penalties and biases change
MESSAGES = [{"role": "user", "content": "Tell me a story."}]  # penalties change its output
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}}]  # fmt: skip
EXTENSIONS = {
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "return_token_ids", "structured_outputs", "add_generation_prompt",
}  # fmt: skip


def openai_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsStreaming.__annotations__) | set(
        module.CompletionCreateParamsNonStreaming.__annotations__
    )


@pytest.fixture(scope="module")
def rt(clusters):
    llama = clusters("llama")
    made = llama.router("tcp", tool_call_parser="hermes")
    yield made
    llama.release(made)


def post(rt, path: str, body: dict) -> httpx.Response:
    return httpx.post(rt.url + path, json=body, timeout=60)


def events(r: httpx.Response) -> list[str]:
    return [line for line in r.text.splitlines() if line.startswith("data: ")]


def _text(r: httpx.Response) -> str:
    ch = r.json()["choices"][0]
    return ch["text"] if "text" in ch else ch["message"]["content"]


# field -> (kind, value, check(response, baseline_response)); baseline = the same request
# without the field (greedy, 24 tokens).
COMPLETION = {
    "model": ("honoured", "no-such-model", lambda r, b: r.status_code == 404),
    "prompt": ("honoured", [9, 8, 7, 6], lambda r, b: _text(r) != _text(b)),
    "best_of": ("honoured", 1, lambda r, b: _text(r) == _text(b)),  # = n; other values: refused
    "echo": (
        "honoured",
        True,
        lambda r, b: (
            r.json()["choices"][0]["text"].endswith(_text(b)) and len(_text(r)) > len(_text(b))
        ),
    ),  # fmt: skip
    "frequency_penalty": ("honoured", 2.0, lambda r, b: _text(r) != _text(b)),
    "presence_penalty": ("honoured", 2.0, lambda r, b: _text(r) != _text(b)),
    "logit_bias": ("honoured", {"388": -100}, lambda r, b: _text(r) != _text(b)),
    "logprobs": (
        "honoured",
        2,
        lambda r, b: len(r.json()["choices"][0]["logprobs"]["tokens"]) == 24,
    ),  # fmt: skip
    "max_tokens": ("honoured", 2, lambda r, b: r.json()["usage"]["completion_tokens"] == 2),
    "n": ("honoured", 2, lambda r, b: len(r.json()["choices"]) == 2),
    "seed": ("honoured", 7, None),  # checked with temperature below
    "stop": ("honoured", None, None),  # value from the baseline's text, below
    "stream": ("honoured", True, lambda r, b: events(r)[-1] == "data: [DONE]"),
    "stream_options": ("honoured", {"include_usage": True}, None),  # with stream, below
    "suffix": ("refused", " the end", None),
    "temperature": ("honoured", 1.5, lambda r, b: _text(r) != _text(b)),
    "top_p": ("honoured", 1e-6, None),  # with temperature, below
    "user": ("noop", "user-42", None),
}
CHAT = {
    "messages": (
        "honoured",
        [{"role": "user", "content": "Another question entirely?"}],
        lambda r, b: _text(r) != _text(b),
    ),  # fmt: skip
    "model": COMPLETION["model"],
    "audio": ("refused", {"voice": "alloy", "format": "wav"}, None),
    "frequency_penalty": COMPLETION["frequency_penalty"],
    "presence_penalty": COMPLETION["presence_penalty"],
    "function_call": ("refused", "auto", None),
    "functions": ("refused", [{"name": "f"}], None),
    "logit_bias": ("honoured", None, None),  # value from the baseline's tokens, below
    "logprobs": (
        "honoured",
        True,
        lambda r, b: len(r.json()["choices"][0]["logprobs"]["content"]) == 24,
    ),  # fmt: skip
    "top_logprobs": ("honoured", 3, None),  # with logprobs, below
    "max_completion_tokens": (
        "honoured",
        2,
        lambda r, b: r.json()["usage"]["completion_tokens"] == 2,
    ),  # fmt: skip
    "max_tokens": ("honoured", 2, lambda r, b: r.json()["usage"]["completion_tokens"] == 2),
    "metadata": ("noop", {"team": "qa"}, None),
    "modalities": ("noop", ["text"], None),  # ["audio"]: refused, below
    "moderation": ("refused", {"model": "omni-moderation-latest"}, None),
    "n": COMPLETION["n"],
    "parallel_tool_calls": ("honoured", False, None),  # with tools, below
    "prediction": ("refused", {"type": "content", "content": "x"}, None),
    "prompt_cache_key": ("noop", "conversation-1", None),
    "prompt_cache_options": ("refused", {"mode": "explicit"}, None),
    "prompt_cache_retention": ("noop", "in_memory", None),  # "24h": refused, below
    "reasoning_effort": ("refused", "high", None),
    "response_format": (
        "honoured",
        {"type": "json_object"},
        lambda r, b: _text(r).startswith("{"),
    ),  # fmt: skip
    "safety_identifier": ("noop", "hash-1", None),
    "seed": COMPLETION["seed"],
    "service_tier": ("noop", "auto", None),  # "flex": refused, below
    "stop": COMPLETION["stop"],
    "store": ("noop", False, None),  # true: refused, below
    "stream": COMPLETION["stream"],
    "stream_options": COMPLETION["stream_options"],
    "temperature": COMPLETION["temperature"],
    "tool_choice": ("honoured", "required", None),  # with tools, below
    "tools": ("honoured", TOOLS, lambda r, b: r.status_code == 200),  # parsed for tool calls
    "top_p": COMPLETION["top_p"],
    "user": COMPLETION["user"],
    "verbosity": ("refused", "low", None),
    "web_search_options": ("refused", {}, None),
}
REFUSED_VALUES = {
    "completions": {"best_of": 3},
    "chat": {
        "modalities": ["text", "audio"],
        "prompt_cache_retention": "24h",
        "service_tier": "flex",
        "store": True,
    },  # fmt: skip
}


def test_every_openai_field_is_classified():
    assert set(COMPLETION) == openai_fields(cp)
    assert set(CHAT) == openai_fields(ccp)
    for model, table in ((CompletionRequest, COMPLETION), (ChatCompletionRequest, CHAT)):
        accepted = set(model.model_fields)
        assert accepted - set(table) <= EXTENSIONS, accepted - set(table) - EXTENSIONS
        refused = {f for f, (kind, _, _) in table.items() if kind == "refused"}
        assert not refused & accepted, refused & accepted  # refused means not accepted


def _walk(rt, path: str, base: dict, table: dict, refused_values: dict) -> None:
    baseline = post(rt, path, base)
    assert baseline.status_code == 200, baseline.text
    for field, (kind, value, check) in table.items():
        if check is None and kind == "honoured":
            continue  # needs another field: checked in its own test
        body = {**base, field: value}
        r = post(rt, path, body)
        if kind == "refused":
            assert r.status_code == 400, (field, r.text)
            assert r.json()["error"]["param"] == field, (field, r.json())
        elif kind == "noop":
            assert r.status_code == 200 and _text(r) == _text(baseline), (field, r.text)
        else:
            assert check(r, baseline), (field, r.status_code, r.text[:300])
    for field, value in refused_values.items():
        r = post(rt, path, {**base, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_completion_fields_honoured_or_refused(rt):
    base = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}  # fmt: skip
    _walk(rt, "/v1/completions", base, COMPLETION, REFUSED_VALUES["completions"])
    _fields_needing_others(rt, "/v1/completions", base)


def test_chat_fields_honoured_or_refused(rt):
    base = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "ignore_eos": True}  # fmt: skip
    _walk(rt, "/v1/chat/completions", base, CHAT, REFUSED_VALUES["chat"])
    _fields_needing_others(rt, "/v1/chat/completions", base)
    first = post(rt, "/v1/chat/completions", {**base, "logprobs": True})
    top = post(rt, "/v1/chat/completions", {**base, "logprobs": True, "top_logprobs": 3})
    assert all(len(t["top_logprobs"]) == 3 for t in top.json()["choices"][0]["logprobs"]["content"])  # fmt: skip
    assert all(t["top_logprobs"] == [] for t in first.json()["choices"][0]["logprobs"]["content"])  # fmt: skip
    token = first.json()["choices"][0]["logprobs"]["content"][0]["token"]
    tok_ids = post(rt, "/tokenize", {"model": MODEL_NAME, "prompt": token, "add_special_tokens": False}).json()["tokens"]  # fmt: skip
    banned = post(rt, "/v1/chat/completions", {**base, "logit_bias": {str(tok_ids[0]): -100}})
    assert _text(banned) != _text(first)
    tools = {**base, "tools": TOOLS, "tool_choice": "required", "max_tokens": 400, "temperature": 1.0}  # fmt: skip
    for seed in range(3):
        one = post(
            rt, "/v1/chat/completions", {**tools, "seed": seed, "parallel_tool_calls": False}
        )
        assert len(one.json()["choices"][0]["message"]["tool_calls"]) == 1


def _fields_needing_others(rt, path: str, base: dict) -> None:
    hot = {**base, "temperature": 1.5}
    a, b, c = (post(rt, path, {**hot, "seed": s}) for s in (7, 7, 8))
    assert _text(a) == _text(b) != _text(c)  # seed
    assert _text(post(rt, path, {**hot, "top_p": 1e-6})) == _text(post(rt, path, base))  # top_p
    text = _text(post(rt, path, base))
    stopped = post(rt, path, {**base, "stop": [text[3:6]]})
    assert _text(stopped) == text[: text.index(text[3:6])]  # stop
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"
    streamed = post(rt, path, {**base, "stream": True, "stream_options": {"include_usage": True}})
    assert '"usage":{"prompt_tokens"' in events(streamed)[-2]  # stream_options
