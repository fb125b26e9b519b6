"""A rank of a TP or EP group killed mid-decode: the in-flight stream fails fast naming the
rank, the leader exits, and the group the launcher restarts serves again."""

from __future__ import annotations

import os
import time

import openai
import pytest

from engine.parallel.health import pid_alive

from .conftest import MODEL_NAME

MAX_NEW = 10
GREEDY = {"max_tokens": MAX_NEW, "temperature": 0.0}
EXTRA = {"ignore_eos": True, "return_token_ids": True}
LONG = {"max_tokens": 1500, "temperature": 0.0, "stream": True}


def kill_mid_stream(c: openai.OpenAI, prompt: list[int], pid: int, named: str) -> None:
    """``pid`` killed once a long stream decodes: the stream fails within 20 s, its error
    naming ``named`` (never a hang)."""
    stream = c.completions.create(model=MODEL_NAME, prompt=prompt, **LONG, extra_body=EXTRA)
    next(iter(stream))  # decoding is under way on the group
    os.kill(pid, 9)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 20
    assert named in str(err.value), err.value


def wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"group processes still running: {pids}"
        time.sleep(0.1)


def greedy_once_recovered(c: openai.OpenAI, prompt: list[int], what: str) -> list[int]:
    """Greedy tokens from the first request that succeeds within 90 s: requests fail (503,
    unreachable) until the restarted group serves."""
    deadline = time.monotonic() + 90
    while True:
        try:
            out = c.completions.create(model=MODEL_NAME, prompt=prompt, **GREEDY, extra_body=EXTRA)
            return out.choices[0].token_ids
        except openai.APIError as exc:
            assert time.monotonic() < deadline, f"{what} did not recover: {exc!r}"
            time.sleep(1)
