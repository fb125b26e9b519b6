"""Request models accept what OpenAI clients send and reject the rest with a reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.protocol import ChatCompletionRequest, CompletionRequest


def test_completion_defaults_and_extensions():
    r = CompletionRequest(model="m", prompt="hi", stop="x", ignore_eos=True, min_tokens=2, top_k=-1)
    assert (r.max_tokens, r.stop, r.stop_token_ids, r.effective_top_k) == (16, ["x"], [], None)
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt == [1, 2]
    assert CompletionRequest(
        model="m", prompt=["a"], stream_options={"include_usage": True}
    ).include_usage


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"n": 17}, "less than or equal to 16"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": ["a", "b"]}, "batched prompts"),
        ({"prompt": ""}, "prompt is empty"),
        ({"stop": ["a"] * 65}, "at most 64"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "only allowed with echo"),
        ({"best_of": 3}, "best_of=3 is not supported"),
        ({"suffix": "x"}, "Extra inputs are not permitted"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias values must be in [-100, 100]"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ],
)
def test_completion_rejects(fields, needle):
    with pytest.raises(ValidationError) as err:
        CompletionRequest(**{"model": "m", "prompt": "hi", **fields})
    assert needle in str(err.value)


def test_chat_message_parts_and_limits():
    r = ChatCompletionRequest(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
        max_completion_tokens=5,
    )
    assert r.messages[0].text() == "ab" and r.requested_max_tokens == 5
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "x"}])
