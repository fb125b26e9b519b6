"""/v1/models (with max_model_len), /tokenize and /detokenize, as vLLM serves them."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine.tokenizer import Tokenizer

from .conftest import MODEL_NAME, client


@pytest.fixture(scope="module")
def rt(clusters):
    llama = clusters("llama")
    made = llama.router("tcp")
    yield made
    llama.release(made)


def post(rt, path: str, body: dict) -> httpx.Response:
    return httpx.post(rt.url + path, json=body, timeout=30)


def test_models_list_and_retrieve(rt):
    c = client(rt)
    (card,) = c.models.list().data
    assert card.id == MODEL_NAME and card.max_model_len == 2048
    assert c.models.retrieve(MODEL_NAME).max_model_len == 2048
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_tokenize_and_detokenize_round_trip(rt, tiny_model):
    tok = Tokenizer.from_dir(tiny_model("llama"))
    text = "The quick brown fox, 42 times!"
    r = post(rt, "/tokenize", {"model": MODEL_NAME, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    assert body["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]]
    back = post(rt, "/detokenize", {"model": MODEL_NAME, "tokens": body["tokens"]})
    assert back.json() == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    chat = post(rt, "/tokenize", {"model": MODEL_NAME, "messages": messages})
    want = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert chat.json()["tokens"] == want
    usage = client(rt).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1).usage  # fmt: skip
    assert usage.prompt_tokens == len(want)  # what a chat request's prompt is


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/detokenize", {"model": MODEL_NAME, "tokens": [5, 99999]}, "tokens"),
        ("/detokenize", {"model": MODEL_NAME, "tokens": [5], "extra": 1}, "extra"),
        ("/tokenize", {"model": MODEL_NAME, "prompt": "x", "suffix": "y"}, None),
        ("/tokenize", {"model": "nope", "prompt": "x"}, "model"),
    ],
)
def test_tokenize_routes_refuse_bad_input(rt, path, body, param):
    r = post(rt, path, body)
    assert r.status_code in (400, 404), r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
