"""The tool-call parser: model output text -> content and tool_calls, identical whatever
the chunking (so a stream reassembles to the whole response), in both formats; and the
grammars that enforce a call accept exactly the calls the parser reads."""

from __future__ import annotations

import json

import llguidance
import pytest

from router.tools.formats import FORMATS
from router.tools.parser import ToolParser

HERMES = (
    "Let me look.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"q": "a } b", "n": [1, 2]}, "name": "search"}\n</tool_call>'
)
LLAMA3 = '<|python_tag|>{"name": "a", "parameters": {"q": "x; y"}}; {"name": "b", "parameters": {}}'


def parse(fmt: str, text: str, chunk: int) -> tuple[str, list[dict]]:
    p = ToolParser(FORMATS[fmt])
    parts = []
    for i in range(0, len(text), chunk):
        parts += p.feed(text[i : i + chunk])
    parts += p.finish()
    content = "".join(x[1] for x in parts if x[0] == "content")
    calls: dict[int, dict] = {}
    for kind, d in parts:
        if kind != "tool":
            continue
        if "id" in d:
            assert d["index"] not in calls and d["function"]["arguments"] == ""
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 10_000])
def test_hermes_calls_any_chunking(chunk):
    content, calls = parse("hermes", HERMES, chunk)
    assert content == "Let me look."
    assert calls == [
        {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
        {"name": "search", "arguments": '{"q": "a } b", "n": [1, 2]}'},
    ]
    assert [json.loads(c["arguments"]) for c in calls][1]["q"] == "a } b"


@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_llama3_json_calls_any_chunking(chunk):
    content, calls = parse("llama3_json", LLAMA3, chunk)
    assert content == ""
    assert calls == [{"name": "a", "arguments": '{"q": "x; y"}'}, {"name": "b", "arguments": "{}"}]


@pytest.mark.parametrize(
    "fmt, text, content, names",
    [
        ("hermes", "plain text, no calls <tool", "plain text, no calls <tool", []),
        ("hermes", "a < b and <tool_cal", "a < b and <tool_cal", []),
        ("hermes", 'cut <tool_call>\n{"nam', 'cut <tool_call>\n{"nam', []),  # no name: content
        ("hermes", 'x<tool_call>\n{"name": "f", "arguments": {"a": 1', "x", ["f"]),  # cut after it
        ("llama3_json", "Hello {not a call", "Hello {not a call", []),
        ("llama3_json", '  {"name": "f", "parameters": {"v": 12}}', "", ["f"]),
    ],
)
def test_partial_and_plain_outputs(fmt, text, content, names):
    for chunk in (1, 4, 1000):
        got, calls = parse(fmt, text, chunk)
        assert got == content and [c["name"] for c in calls] == names


@pytest.mark.parametrize("fmt, text", [("hermes", HERMES), ("llama3_json", LLAMA3)])
def test_grammar_accepts_the_format_the_parser_reads(tiny_model, fmt, text):
    f = FORMATS[fmt]
    functions = {
        "get_weather": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },  # fmt: skip
        "search": {"type": "object"},
        "a": {"type": "object"},
        "b": {"type": "object"},
    }
    tok_json = (tiny_model("llama") / "tokenizer.json").read_text()
    tok = llguidance.LLTokenizer(tok_json, eos_token=0)
    calls = parse(fmt, text, 1000)[1]
    body = f.separator.join(
        (f.start + "\n" if f.start else "")
        + json.dumps({"name": c["name"], f.args_key: json.loads(c["arguments"])})
        + ("\n" + f.end if f.end else "")
        for c in calls
    )
    for parallel, ok in ((True, True), (False, len(calls) == 1)):
        m = llguidance.LLMatcher(tok, f.grammar(functions, parallel), log_level=0)
        assert m.consume_tokens(tok.tokenize_str(body)) == ok, m.get_error()
        if ok:
            assert m.is_accepting()
    unknown = f.grammar({"only_this": {"type": "object"}}, False)
    m = llguidance.LLMatcher(tok, unknown, log_level=0)
    assert not m.consume_tokens(tok.tokenize_str(body))  # a name outside the tools: refused
