"""The tiny models' chat templates render tools, assistant tool calls and tool results as
the real Hermes / Llama-3 templates do, and as transformers renders the same template."""

from __future__ import annotations

import json

import pytest

from engine.tiny_model import make_tiny_model
from engine.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & later",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # fmt: skip
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
]


@pytest.fixture(scope="module", params=["hermes", "llama3"])
def model(request, tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp(request.param), chat_format=request.param)  # fmt: skip


def test_template_with_tools_equals_transformers(model):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(model).apply_chat_template(MESSAGES, tools=TOOLS)
    theirs = AutoTokenizer.from_pretrained(model).apply_chat_template(
        MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert "Weather <now> & later" in ours  # tojson as json.dumps, not HTML-escaped
    assert ours.count('"get_weather"') >= 3  # the tool and both calls


def test_hermes_shape(tmp_path):
    d = make_tiny_model("llama", tmp_path, chat_format="hermes")
    text = Tokenizer.from_dir(d).apply_chat_template(MESSAGES, tools=TOOLS)
    tool = json.dumps(TOOLS[0], ensure_ascii=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{tool}\n</tools>" in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}\n{call}<|im_end|>\n" in text
    responses = "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response>"
    assert f"<|im_start|>user\n{responses}<|im_end|>\n<|im_start|>assistant\n" in text
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert Tokenizer.from_dir(d).apply_chat_template(plain) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_shape(tmp_path):
    d = make_tiny_model("llama", tmp_path, chat_format="llama3")
    text = Tokenizer.from_dir(d).apply_chat_template(MESSAGES, tools=TOOLS)
    assert "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions" in text
    assert json.dumps(TOOLS[0], indent=4) in text
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{call}; {call}<|eot_id|>" in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in text
