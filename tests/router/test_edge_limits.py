"""The router's edge, unit by unit: static bounds in the request models, the chat template
compiled once, tokenization bounded by the context, and the API key's sources."""

from __future__ import annotations

import logging

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from engine.config import RouterConfig
from engine.sampling_params import MAX_SEED, MAX_STOP_TOKEN_IDS, MAX_TOKEN_ID, MIN_TEMPERATURE
from engine.tokenizer import PromptTooLong, Tokenizer
from router.launch.cli import build_parser
from router.launch.flags import serve_config
from router.launch.secrets import api_key
from router.protocol import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(**{"model": "m", "prompt": "hi", **fields})


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"temperature": 1e-45}, f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}"),
        ({"temperature": MIN_TEMPERATURE / 2}, "temperature must be 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 2**32}, f"less than or equal to {MAX_TOKEN_ID}"),
        ({"seed": MAX_SEED + 1}, f"less than or equal to {MAX_SEED}"),
        ({"max_tokens": 2**32}, f"less than or equal to {MAX_TOKEN_ID}"),
        ({"min_tokens": 2**32}, f"less than or equal to {MAX_TOKEN_ID}"),
        ({"stop_token_ids": [2**32]}, f"less than or equal to {MAX_TOKEN_ID}"),
        ({"stop_token_ids": [-1]}, "greater than or equal to 0"),
        ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, f"at most {MAX_STOP_TOKEN_IDS}"),
        ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, f"at most {MAX_STOP_STRINGS} strings"),
        ({"stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, f"stop[1] is {MAX_STOP_CHARS + 1}"),
        ({"stop": ["ok", ""]}, "stop[1] is 0 characters"),
        ({"logprobs": 21}, "less than or equal to 20"),
    ],
)
def test_security_static_bounds_refuse_what_the_engine_cannot_hold(fields, needle):
    with pytest.raises(ValidationError) as err:
        completion(**fields)
    assert needle in str(err.value)


def test_security_static_bounds_accept_their_edges():
    r = completion(
        temperature=MIN_TEMPERATURE, top_k=MAX_TOKEN_ID, seed=MAX_SEED,
        stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, stop_token_ids=[0] * MAX_STOP_TOKEN_IDS,
    )  # fmt: skip
    assert len(r.stop) == MAX_STOP_STRINGS and completion(temperature=0).temperature == 0
    chat = ChatCompletionRequest(
        model="m",
        messages=[{"role": "system", "content": "abc"}, {"role": "user", "content": "de"}],
    )
    assert chat.num_chars() == 5
    with pytest.raises(ValidationError, match="less than or equal to 20"):
        ChatCompletionRequest(model="m", messages=chat.messages, top_logprobs=21)


def test_chat_template_is_compiled_once(tiny_model, monkeypatch):
    compiled = []
    real = ImmutableSandboxedEnvironment.from_string

    def counting(self, source, *args, **kw):
        compiled.append(source)
        return real(self, source, *args, **kw)

    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string", counting)
    tok = Tokenizer.from_dir(tiny_model("llama"))
    texts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in ("a", "b", "c")]
    assert len(compiled) == 1
    assert texts[1] == "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n"


def test_encode_stops_at_the_token_limit(tiny_model):
    tok = Tokenizer.from_dir(tiny_model("llama"))
    text = "the quick brown fox " * 50
    ids = tok.encode(text)
    assert tok.encode(text, max_tokens=len(ids)) == ids
    with pytest.raises(PromptTooLong) as err:
        tok.encode(text, max_tokens=len(ids) - 1)
    assert (err.value.num_tokens, err.value.limit) == (len(ids), len(ids) - 1)


def test_security_api_key_file_env_and_a_warning_for_the_flag(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert api_key(str(key), None) == "s3cret"
    assert api_key(None, None) is None
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    assert api_key(None, None) == "from-env"
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        assert api_key(None, "k") == "k"
    assert "--api-key is visible" in caplog.text and "--api-key-file" in caplog.text
    with pytest.raises(ValueError, match="not both"):
        api_key(str(key), "k")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        api_key(str(tmp_path / "empty"), None)
    with pytest.raises(ValueError, match="cannot read --api-key-file"):
        api_key(str(tmp_path / "missing"), None)


def _serve(*argv: str):
    return serve_config(build_parser().parse_args(["serve", "--model", "m", *argv]))


def test_edge_flags_override_only_what_is_given(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    assert _serve().router == RouterConfig("m")
    given = _serve("--max-body-bytes", "4096", "--stream-stall-timeout", "2.5")
    assert given.router == RouterConfig("m", max_body_bytes=4096, stream_stall_timeout_s=2.5)
