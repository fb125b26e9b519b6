"""Property-based fuzz of ``SamplingParams``: every valid combination constructs (and
survives the proto round trip unchanged); anything else raises ``ValueError`` naming
every bad field, never another exception. The oracle below restates the documented
bounds independently of the code under test."""

from __future__ import annotations

import math
import re

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SamplingParams,
)
from engine.worker.convert import params_from_pb, params_to_pb
from tests.fuzzing import budget

FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids",
    "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "min_p", "logit_bias", "prompt_logprobs",
)  # fmt: skip
DEFAULTS = {name: getattr(SamplingParams(), name) for name in FIELDS}


def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)  # fmt: skip


def _in(v, lo, hi, optional=False) -> bool:
    return (optional and v is None) or (_int(v) and lo <= v <= hi)


def _within(v, lo, hi) -> bool:
    return _real(v) and lo <= v <= hi


def _bias_ok(bias) -> bool:
    if not isinstance(bias, (list, tuple)) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        return False
    pairs = [p for p in bias if isinstance(p, (list, tuple)) and len(p) == 2]
    return (
        len(pairs) == len(bias)
        and all(_in(t, 0, MAX_TOKEN_ID) and _within(b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for t, b in pairs)
        and len({int(t) for t, _ in pairs}) == len(pairs)
    )  # fmt: skip


def invalid_fields(kw: dict) -> set[str]:
    """The fields of ``kw`` (defaults filled in) outside their documented domain."""
    f = {**DEFAULTS, **kw}
    t, ids = f["temperature"], f["stop_token_ids"]
    max_ok = _in(f["max_tokens"], 1, MAX_TOKEN_ID)
    ok = {
        "max_tokens": max_ok,
        "min_tokens": _in(f["min_tokens"], 0, f["max_tokens"] if max_ok else MAX_TOKEN_ID),
        "temperature": _real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
        "top_k": _in(f["top_k"], 1, MAX_TOKEN_ID, optional=True),
        "top_p": _real(f["top_p"]) and 0 < f["top_p"] <= 1,
        "seed": _in(f["seed"], 0, MAX_SEED, optional=True),
        "stop_token_ids": isinstance(ids, (list, tuple))
        and len(ids) <= MAX_STOP_TOKEN_IDS
        and all(_in(i, 0, MAX_TOKEN_ID) for i in ids),
        "ignore_eos": isinstance(f["ignore_eos"], bool),
        "logprobs": _in(f["logprobs"], 0, MAX_LOGPROBS, optional=True),
        "presence_penalty": _within(f["presence_penalty"], -MAX_PENALTY, MAX_PENALTY),
        "frequency_penalty": _within(f["frequency_penalty"], -MAX_PENALTY, MAX_PENALTY),
        "repetition_penalty": _within(
            f["repetition_penalty"], MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        ),  # fmt: skip
        "min_p": _within(f["min_p"], 0.0, 1.0),
        "logit_bias": _bias_ok(f["logit_bias"]),
        "prompt_logprobs": _in(f["prompt_logprobs"], 0, MAX_LOGPROBS, optional=True),
    }
    return {name for name, good in ok.items() if not good}


def _edges(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers clustered on both sides of ``[lo, hi]``'s ends, plus any integer."""
    near = st.sampled_from([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 2**32, 2**63, -(2**63)])
    return st.one_of(near, st.integers(lo, hi), st.integers())


def _float_edges(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats on both sides of ``[lo, hi]``'s ends (and 5e-324), plus any float."""
    near = st.sampled_from([lo, hi, lo - 1e-9, hi + 1e-9, 5e-324, -5e-324, 0.0, math.nan])
    return st.one_of(near, st.floats(lo, hi), st.floats(), st.integers(-3, 3))


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.integers(-(2**63), 2**63 - 1).map(np.int64), st.decimals(allow_nan=True, places=2),
)  # fmt: skip
"""Values of every JSON-ish type (and a few Python ones) for any field."""

TEMPERATURES = st.one_of(
    st.sampled_from([0.0, 0, MIN_TEMPERATURE, MAX_TEMPERATURE, 1e-45, MIN_TEMPERATURE / 2]),
    st.floats(0.0, MAX_TEMPERATURE * 2),
    st.floats(allow_nan=True, allow_infinity=True),
)
PER_FIELD = {
    "max_tokens": _edges(1, MAX_TOKEN_ID),
    "min_tokens": _edges(0, MAX_TOKEN_ID),
    "temperature": TEMPERATURES,
    "top_k": st.one_of(st.none(), _edges(1, MAX_TOKEN_ID)),
    "top_p": st.one_of(st.sampled_from([0.0, 1.0, 1.0 + 1e-9, 5e-324]), st.floats()),
    "seed": st.one_of(st.none(), _edges(0, MAX_SEED)),
    "stop_token_ids": st.one_of(
        st.lists(_edges(0, MAX_TOKEN_ID), max_size=MAX_STOP_TOKEN_IDS + 2).map(tuple),
        st.lists(
            st.integers(0, 600), min_size=MAX_STOP_TOKEN_IDS - 1, max_size=MAX_STOP_TOKEN_IDS + 1
        ),
    ),  # fmt: skip
    "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), _edges(0, MAX_LOGPROBS)),
    "presence_penalty": _float_edges(-MAX_PENALTY, MAX_PENALTY),
    "frequency_penalty": _float_edges(-MAX_PENALTY, MAX_PENALTY),
    "repetition_penalty": _float_edges(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
    "min_p": _float_edges(0.0, 1.0),
    "logit_bias": st.one_of(
        st.lists(
            st.tuples(_edges(0, MAX_TOKEN_ID), _float_edges(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)),
            max_size=4,
        ),  # fmt: skip
        st.lists(st.tuples(st.integers(0, 3), st.floats(-1, 1)), min_size=2, max_size=4),  # repeats
        st.lists(
            st.one_of(st.integers(), st.tuples(st.integers()), st.text(max_size=2)), max_size=2
        ),  # fmt: skip
    ),
    "prompt_logprobs": st.one_of(st.none(), _edges(0, MAX_LOGPROBS)),
}
ANY_PARAMS = st.fixed_dictionaries(
    {}, optional={name: st.one_of(PER_FIELD[name], HOSTILE) for name in FIELDS}
)


@st.composite
def valid_params(draw) -> dict:
    max_tokens = draw(st.one_of(st.integers(1, 64), st.integers(1, MAX_TOKEN_ID)))
    kw = {
        "max_tokens": max_tokens,
        "min_tokens": draw(st.integers(0, max_tokens)),
        "temperature": draw(st.one_of(st.just(0.0), st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE))),
        "top_k": draw(st.one_of(st.none(), st.integers(1, MAX_TOKEN_ID))),
        "top_p": draw(st.floats(0.0, 1.0, exclude_min=True)),
        "seed": draw(st.one_of(st.none(), st.integers(0, MAX_SEED))),
        "stop_token_ids": tuple(
            draw(st.lists(st.integers(0, MAX_TOKEN_ID), max_size=MAX_STOP_TOKEN_IDS))
        ),  # fmt: skip
        "ignore_eos": draw(st.booleans()),
        "logprobs": draw(st.one_of(st.none(), st.integers(0, MAX_LOGPROBS))),
        "presence_penalty": draw(st.floats(-MAX_PENALTY, MAX_PENALTY)),
        "frequency_penalty": draw(st.floats(-MAX_PENALTY, MAX_PENALTY)),
        "repetition_penalty": draw(st.floats(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)),
        "min_p": draw(st.floats(0.0, 1.0)),
        "logit_bias": tuple(
            draw(
                st.dictionaries(
                    st.integers(0, MAX_TOKEN_ID),
                    st.floats(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),
                    max_size=8,
                )
            ).items()  # fmt: skip
        ),
        "prompt_logprobs": draw(st.one_of(st.none(), st.integers(0, MAX_LOGPROBS))),
    }
    keep = {k for k in kw if draw(st.booleans())}
    if "min_tokens" in keep:  # the default max_tokens may be below it
        keep.add("max_tokens")
    return {k: v for k, v in kw.items() if k in keep}


@budget(300)
@given(ANY_PARAMS)
def test_fuzz_sampling_params_accept_exactly_the_documented_domain(kw):
    bad = invalid_fields(kw)
    try:
        params = SamplingParams(**kw)
    except ValueError as exc:
        message = str(exc)
        assert bad, f"valid params refused: {kw!r}: {message}"
        named = set(re.findall(r"\b(" + "|".join(FIELDS) + r")(?: token ids| values)? (?:must|takes|names)", message))  # fmt: skip
        assert named == bad, f"{kw!r}: the message names {named}, the bad fields are {bad}"
        return
    assert not bad, f"invalid {sorted(bad)} accepted: {kw!r}"
    # What the engine gets is plain Python numbers, whatever the caller passed.
    assert all(type(params.stop_token_ids[i]) is int for i in range(len(params.stop_token_ids)))
    assert type(params.max_tokens) is int and type(params.temperature) is float
    assert all(type(t) is int and type(b) is float for t, b in params.logit_bias)
    assert type(params.repetition_penalty) is float and type(params.min_p) is float


@budget(200)
@given(valid_params())
def test_fuzz_valid_sampling_params_round_trip_through_the_proto(kw):
    params = SamplingParams(**kw)
    assert params_from_pb(params_to_pb(params)) == params
    assert params.greedy == (params.temperature == 0.0)


def test_fuzz_sampling_params_numpy_and_float_ints():
    """Regression (found by the fuzzer): numpy ints are accepted as ints, floats for int
    fields and bools for numbers are refused, a non-list stop_token_ids is refused
    (``tuple(5)`` used to raise TypeError), and bad ``max_tokens`` no longer breaks the
    ``min_tokens`` check (``0 <= 0 <= None`` raised TypeError)."""
    p = SamplingParams(max_tokens=np.int64(8), top_k=np.int32(3), stop_token_ids=[np.int64(2)])
    assert (p.max_tokens, p.top_k, p.stop_token_ids) == (8, 3, (2,))
    assert type(p.max_tokens) is int
    for kw, field in [
        ({"top_k": 2.5}, "top_k"), ({"max_tokens": True}, "max_tokens"),
        ({"stop_token_ids": 5}, "stop_token_ids"), ({"max_tokens": None}, "max_tokens"),
        ({"temperature": None}, "temperature"), ({"top_p": "1"}, "top_p"),
        ({"ignore_eos": "yes"}, "ignore_eos"), ({"temperature": float("nan")}, "temperature"),
    ]:  # fmt: skip
        try:
            SamplingParams(**kw)
        except ValueError as exc:
            assert f"{field} must" in str(exc), str(exc)
        else:
            raise AssertionError(f"{kw} accepted")
