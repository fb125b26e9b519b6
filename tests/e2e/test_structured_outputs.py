"""Structured outputs through the real server and the real openai client, aggregated and
disaggregated over tcp and shm. The tiny random model's free output is noise, so every
response that parses and validates proves the grammar mask was applied, on the prefill
worker's first token and on the decode worker's continuation alike."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from tests.e2e.schemas import SCHEMAS

from .conftest import API_MODES, MODEL_NAME, client, completion_text

MODES = API_MODES
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]


@pytest.fixture(scope="module")
def llama(clusters):
    return clusters("llama")


def _response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}  # fmt: skip


def _chat(rt, name: str, stream: bool, **kw) -> tuple[str, str]:
    c = client(rt)
    args = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=200, response_format=_response_format(name), **kw)  # fmt: skip
    if not stream:
        choice = c.chat.completions.create(**args).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = list(c.chat.completions.create(stream=True, **args))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("mode", MODES)
def test_structured_json_schema_every_schema_validates(mode_routers, mode):
    free = client(mode_routers[mode]).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0
    )
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # unconstrained: noise
    for name, schema in SCHEMAS.items():
        texts = set()
        for stream in (False, True):
            text, reason = _chat(mode_routers[mode], name, stream, temperature=0)
            assert reason == "stop", (name, stream, text)
            jsonschema.validate(json.loads(text), schema)
            texts.add(text)
        assert len(texts) == 1, (name, texts)  # greedy: streamed == whole


def test_structured_sampled_outputs_validate_in_every_mode(mode_routers):
    for mode in MODES:
        for seed in range(3):
            for name in ("nested_address", "any_of", "array_of_objects"):
                text, reason = _chat(
                    mode_routers[mode], name, seed % 2 == 1, temperature=1.0, seed=seed
                )
                assert reason == "stop", (mode, name, text)
                jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_structured_same_output_aggregated_and_disaggregated(mode_routers):
    for name in ("person", "deep", "pattern_code"):
        outs = {mode: _chat(mode_routers[mode], name, False, temperature=0)[0] for mode in MODES}
        assert len(set(outs.values())) == 1, outs


def test_structured_json_object_and_completions_extension(mode_routers):
    for mode in ("aggregated", "tcp"):
        c = client(mode_routers[mode])
        r = c.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=200,
            temperature=0, response_format={"type": "json_object"},
        )  # fmt: skip
        if r.choices[0].finish_reason == "stop":  # any object: strings are unbounded
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.choices[0].message.content.startswith("{")
        cases = {
            "regex": (r"[a-z]{3}-[0-9]{2,3}", lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2,3}", t)),
            "choice": (["north", "south", "east"], lambda t: t in ("north", "south", "east")),
            "grammar": (
                'start: "v" DIGIT DIGIT\nDIGIT: /[0-9]/',
                lambda t: re.fullmatch(r"v[0-9]{2}", t),
            ),  # fmt: skip
            "json": (
                SCHEMAS["person"],
                lambda t: jsonschema.validate(json.loads(t), SCHEMAS["person"]) or True,
            ),  # fmt: skip
        }
        for kind, (spec, ok) in cases.items():
            for stream in (False, True):
                kw = dict(
                    model=MODEL_NAME, prompt="Answer:", max_tokens=60, temperature=0.7, seed=4
                )
                kw["extra_body"] = {"structured_outputs": {kind: spec}}
                text, reason = completion_text(c, stream, **kw)
                assert reason == "stop" and ok(text), (mode, kind, stream, text)


def test_structured_n3_choices_all_validate(mode_routers):
    r = client(mode_routers["tcp"]).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=11, n=3,
        response_format=_response_format("nested_address"),
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["nested_address"])


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
         "response_format", "not a valid JSON Schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}},
         "response_format", "not a valid JSON Schema: '((' is not a 'regex'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
         "response_format", "cannot be compiled: Pointer '/nope' does not exist"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "unclosed character class"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs", "unknown name"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "at least 1"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "response_format", "both constrain the output"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ],
)  # fmt: skip
def test_structured_bad_specs_are_400_naming_the_field(mode_routers, body, param, needle):
    payload = {"model": MODEL_NAME, "messages": MESSAGES, **body}
    r = httpx.post(mode_routers["tcp"].url + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_structured_local_prefill_and_fallback_keep_the_grammar(llama):
    """Conditional disaggregation (prefill on the decode worker) and the local fallback
    after a remote prefill timed out run the whole grammar on the decode worker."""
    from tests.e2e.test_parity import routed

    local = llama.router("tcp", local_prefill_tokens=10_000)
    hurried = llama.router("tcp", prefill_timeout_s=0.001)
    try:
        text, reason = _chat(local, "nested_address", False, temperature=0)
        jsonschema.validate(json.loads(text), SCHEMAS["nested_address"])
        assert reason == "stop" and routed(local, "local", "short_prompt") == 1
        for name in ("deep", "any_of"):
            text, reason = _chat(hurried, name, True, temperature=0)
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert routed(hurried, "local", "prefill_timeout") == 2
    finally:
        llama.release(local, hurried)
