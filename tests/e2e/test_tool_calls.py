"""Tool calling through the real server and the openai client: tool_choice required or
named always yields a call of a declared function whose arguments validate against its
parameters (the tiny model's free output is noise: the grammar makes the call), in the
hermes and llama3_json formats, aggregated and disaggregated; streamed deltas reassemble
to the same call; tools and tool results reach the chat template."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from engine.tokenizer import Tokenizer
from tests.e2e.schemas import SMALL, obj

from .conftest import MODEL_NAME, client

WEATHER = obj({"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}})  # fmt: skip
SEARCH = obj({"query": {"type": "string", "maxLength": 12}, "limit": SMALL})
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },  # fmt: skip
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_9",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
            }
        ],  # fmt: skip
    },
    {"role": "tool", "tool_call_id": "call_9", "content": "sunny, 22C"},
    {"role": "user", "content": "And tomorrow?"},
]
NAMED = {"type": "function", "function": {"name": "search"}}


@pytest.fixture(scope="module")
def llama(clusters):
    return clusters("llama")


@pytest.fixture(scope="module")
def routers(llama):
    made = {
        (fmt, mode): llama.router(mode, tool_call_parser=fmt)
        for fmt in ("hermes", "llama3_json")
        for mode in ("aggregated", "tcp", "shm")
    }
    yield made
    llama.release(*made.values())


def _check_calls(calls, names: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def _streamed_calls(stream) -> tuple[list[dict], str, str]:
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        reason = choice.finish_reason or reason
        for d in choice.delta.tool_calls or ():
            if d.id is not None:
                assert d.index not in calls and d.type == "function" and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    return [calls[i] for i in sorted(calls)], content, reason


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
@pytest.mark.parametrize("mode", ["aggregated", "tcp", "shm"])
def test_tool_choice_required_and_named_always_parse(routers, fmt, mode):
    c = client(routers[(fmt, mode)])
    free = c.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, max_tokens=40, temperature=0)  # fmt: skip
    assert not free.choices[0].message.tool_calls  # tool_choice auto: the noise calls nothing
    for seed in range(3):
        kw = dict(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, max_tokens=600, temperature=1.0, seed=seed)  # fmt: skip
        req = c.chat.completions.create(tool_choice="required", **kw).choices[0]
        _check_calls(req.message.tool_calls, set(PARAMS))
        assert req.finish_reason == "tool_calls" and req.message.content is None
        one = c.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
        assert len(one.choices[0].message.tool_calls) == 1
        named = c.chat.completions.create(tool_choice=NAMED, **kw).choices[0]
        _check_calls(named.message.tool_calls, {"search"})
        assert len(named.message.tool_calls) == 1 and named.finish_reason == "stop"


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_tool_call_stream_reassembles_to_the_same_call(routers, fmt):
    c = client(routers[(fmt, "tcp")])
    for choice in ("required", NAMED):
        kw = dict(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, tool_choice=choice, max_tokens=600, temperature=0)  # fmt: skip
        whole = c.chat.completions.create(**kw).choices[0]
        calls, content, reason = _streamed_calls(c.chat.completions.create(stream=True, **kw))
        want = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        assert [(x["name"], x["arguments"]) for x in calls] == want
        assert reason == whole.finish_reason and content == ""
        assert len({x["id"] for x in calls}) == len(calls)


def test_tool_template_renders_tools_and_tool_results(routers, tiny_model):
    rt = routers[("hermes", "aggregated")]
    r = httpx.post(rt.url + "/tokenize", json={"model": MODEL_NAME, "messages": HISTORY, "tools": TOOLS}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    tok = Tokenizer.from_dir(tiny_model("llama"))
    text = tok.decode(r.json()["tokens"], skip_special_tokens=False)
    assert json.dumps(TOOLS[0]) in text and "<tool_response>\nsunny, 22C\n</tool_response>" in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>'
    assert call in text
    plain = httpx.post(rt.url + "/tokenize", json={"model": MODEL_NAME, "messages": HISTORY[:1]}, timeout=30)  # fmt: skip
    assert "<tools>" not in tok.decode(plain.json()["tokens"], skip_special_tokens=False)


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),  # fmt: skip
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools",
            "must match",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "distinct name"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
                ]
            },
            "tools",
            "not a valid JSON Schema",
        ),  # fmt: skip
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools", "function"),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice auto",
        ),  # fmt: skip
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(routers, body, param, needle):
    payload = {"model": MODEL_NAME, "messages": HISTORY, **body}
    r = httpx.post(routers[("hermes", "tcp")].url + "/v1/chat/completions", json=payload, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_tools_without_a_parser_are_refused_unless_tool_choice_none(llama):
    rt = llama.router("aggregated")
    try:
        body = {"model": MODEL_NAME, "messages": HISTORY, "tools": TOOLS, "max_tokens": 4}
        r = httpx.post(rt.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "--tool-call-parser" in r.json()["error"]["message"]
        ok = httpx.post(rt.url + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=30)  # fmt: skip
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    finally:
        llama.release(rt)
