"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest

from engine.tokenizer import Tokenizer
from router.detok import TextStream


@pytest.fixture(scope="module")
def tok(tiny_model):
    return Tokenizer.from_dir(tiny_model("llama"))


def _stream(tok, ids, stop=None, step=1):
    ts = TextStream(tok, stop)
    pieces = [ts.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(ts.flush())
    return pieces, ts


@pytest.mark.parametrize("step", [1, 3])
def test_incremental_text_equals_full_decode(tok, step):
    text = "Hello wörld — naïve café ☕ done. Ünïcode ok"
    ids = tok.encode(text)
    pieces, _ = _stream(tok, ids, step=step)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(1 for p in pieces if p) > 3  # emitted incrementally, not at the end


def test_random_token_ids_match_full_decode(tok):
    ids = list(range(200, 300)) + list(range(40, 60))
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)


def test_stop_string_spanning_tokens_truncates(tok):
    ids = tok.encode("one two three four five")
    pieces, ts = _stream(tok, ids, stop=["ee fo"])
    assert ts.stopped and "".join(pieces) == "one two thr"


def test_earliest_stop_wins_and_nothing_follows(tok):
    ids = tok.encode("alpha beta gamma delta")
    ts = TextStream(tok, ["delta", "beta"])
    out = "".join(ts.add([t]) for t in ids) + ts.flush()
    assert out == "alpha " and ts.stopped
    assert ts.add(tok.encode(" more")) == ""


def test_held_back_text_is_released_when_no_stop_matches(tok):
    ids = tok.encode("abcdefgh")
    pieces, ts = _stream(tok, ids, stop=["xyz12345"])
    assert not ts.stopped and "".join(pieces) == "abcdefgh"
