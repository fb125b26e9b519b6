"""Property-based fuzz of the worker.proto converters (proto/convert.py): valid values
round-trip unchanged; any message a peer could send either converts to valid engine
parameters or raises ``ValueError`` (which the workers answer INVALID_ARGUMENT), never
another exception."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker.convert import (
    chunk_from_output,
    params_from_pb,
    params_to_pb,
    token_logprobs,
    token_to_pb,
)
from kv_transfer import TransferTicket
from kv_transfer.wire import ticket_from_pb, ticket_to_pb
from proto import worker_pb2 as pb
from tests.engine.test_fuzz_sampling_params import valid_params
from tests.fuzzing import budget

U32, U64 = 2**32 - 1, 2**64 - 1
I64 = (-(2**63), 2**63 - 1)
DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 0.01, 100.0, 100.0000001, 1.0, 1.0000001, 5e-324]),
)
U32S = st.one_of(st.integers(0, U32), st.sampled_from([0, 1, 511, 512, 2**31 - 1, 2**31, U32]))


@st.composite
def pb_params(draw) -> pb.SamplingParams:
    """Any SamplingParams message a peer could send: every field within its proto type."""
    msg = pb.SamplingParams(
        max_tokens=draw(U32S), min_tokens=draw(U32S), temperature=draw(DOUBLES),
        top_p=draw(DOUBLES), stop_token_ids=draw(st.lists(U32S, max_size=70)),
        ignore_eos=draw(st.booleans()),
    )  # fmt: skip
    if draw(st.booleans()):
        msg.top_k = draw(U32S)
    if draw(st.booleans()):
        msg.seed = draw(st.integers(*I64))
    if draw(st.booleans()):
        msg.logprobs = draw(U32S)
    _draw_controls(draw, msg)
    return msg


KINDS = st.sampled_from(["json", "json_object", "regex", "choice", "grammar", "", "xml"])


def _draw_controls(draw, msg: pb.SamplingParams) -> None:
    """The sampling-control fields (penalties, bias, grammar, prompt logprobs)."""
    msg.presence_penalty, msg.frequency_penalty = draw(DOUBLES), draw(DOUBLES)
    msg.min_p = draw(DOUBLES)
    bias = st.builds(pb.LogitBias, token_id=U32S, bias=DOUBLES)
    msg.logit_bias.extend(draw(st.lists(bias, max_size=4)))
    if draw(st.booleans()):
        msg.repetition_penalty = draw(DOUBLES)
    if draw(st.booleans()):
        msg.prompt_logprobs = draw(U32S)
    if draw(st.booleans()):
        msg.structured.kind, msg.structured.spec = draw(KINDS), draw(st.text(max_size=8))


@st.composite
def near_valid_pb_params(draw) -> pb.SamplingParams:
    """Mostly valid messages (as a router sends), some with one field off its bounds,
    some anything at all: what reaches the engine is then exercised, not only refused."""
    kind = draw(st.sampled_from(["valid", "valid", "one_off", "any"]))
    if kind == "any":
        return draw(pb_params())
    msg = params_to_pb(SamplingParams(**draw(valid_params())))
    if kind == "one_off":
        wild = draw(pb_params())
        field = draw(st.sampled_from(list(pb.SamplingParams.DESCRIPTOR.fields)))
        _copy_field(msg, wild, field)
    return msg


def _copy_field(msg, wild, field) -> None:
    """``msg``'s ``field`` becomes ``wild``'s (unset where ``wild`` leaves it unset)."""
    name = field.name
    if field.is_repeated:
        msg.ClearField(name)
        getattr(msg, name).extend(getattr(wild, name))
    elif field.has_presence and not wild.HasField(name):
        msg.ClearField(name)
    elif field.message_type is not None:
        getattr(msg, name).CopyFrom(getattr(wild, name))
    else:
        setattr(msg, name, getattr(wild, name))


@budget(300)
@given(pb_params())
def test_fuzz_params_from_any_message_is_valid_or_a_value_error(msg):
    try:
        params = params_from_pb(msg)
    except ValueError as exc:
        assert str(exc).startswith("invalid sampling params: "), exc
        return
    assert isinstance(params, SamplingParams)
    assert (params.max_tokens, params.min_tokens) == (msg.max_tokens, msg.min_tokens)
    assert params.temperature == msg.temperature and math.isfinite(params.top_p)
    assert params.stop_token_ids == tuple(msg.stop_token_ids)


TICKETS = st.builds(
    TransferTicket,
    transfer_id=st.text(max_size=40),
    endpoint=st.text(max_size=40),
    block_ids=st.lists(st.integers(0, U32), max_size=50).map(tuple),
    epoch=st.integers(0, U64),
    lease_deadline=st.floats(allow_nan=False),
    backend=st.sampled_from(["tcp", "shm", "ucx", "torch_dist", ""]),
    signature=st.binary(max_size=40),
)


@budget(150)
@given(TICKETS)
def test_fuzz_tickets_round_trip(ticket):
    msg = ticket_to_pb(ticket)
    back = ticket_from_pb(pb.TransferTicket.FromString(msg.SerializeToString()))
    assert back == ticket


F32 = st.floats(width=32, allow_nan=False, max_value=0.0)
"""Log-probabilities as the proto carries them (float32), -inf for masked tokens."""


@st.composite
def token_with_logprobs(draw) -> tuple[int, dict[int, float] | None, int | None]:
    token = draw(st.integers(0, U32))
    if draw(st.booleans()):
        return token, None, None
    alts = draw(st.dictionaries(st.integers(0, U32), F32, max_size=25))
    alts[token] = draw(F32)
    return token, alts, draw(st.one_of(st.none(), st.integers(0, 20)))


@budget(150)
@given(token_with_logprobs())
def test_fuzz_tokens_round_trip_with_their_logprobs(case):
    token, logprobs, num_top = case
    msg = pb.Token.FromString(token_to_pb(token, logprobs, num_top).SerializeToString())
    assert msg.token_id == token
    got = token_logprobs(msg)
    if logprobs is None:
        assert got is None
        return
    assert got[token] == logprobs[token]
    tops = [t.logprob for t in msg.top_logprobs]
    assert len(tops) == min(num_top or 0, len(logprobs)) and tops == sorted(tops, reverse=True)
    assert all(got[t] == logprobs[t] for t in got)  # float32 values survive exactly


@budget(100)
@given(st.lists(token_with_logprobs(), min_size=0, max_size=6), st.booleans())
def test_fuzz_chunks_carry_every_token(cases, finished):
    lps = [lp or {t: -1.0} for t, lp, _ in cases]
    out = RequestOutput("r", [t for t, _, _ in cases], lps, finished, "length" if finished else None, 3, 1, len(cases))  # fmt: skip
    chunk = pb.TokenChunk.FromString(chunk_from_output(out, 5).SerializeToString())
    assert [t.token_id for t in chunk.tokens] == out.new_token_ids
    assert chunk.finished == finished and chunk.num_output_tokens == len(cases)


def test_fuzz_numpy_scalars_convert():
    """The engine's tensors hand out numpy scalars; the converters take them as ints."""
    params = SamplingParams(max_tokens=np.int64(4), top_k=np.int32(2))
    msg = pb.SamplingParams.FromString(params_to_pb(params).SerializeToString())
    assert params_from_pb(msg) == params
