"""Property-based fuzz of the batched sampler: for finite logits and any valid
``SamplingParams`` every row gets a token (a row fails only for non-finite logits), the
token lies in the row's top-k / top-p set and outside its suppressed ids, and greedy rows
take the argmax."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from engine.sampler import SampleFailure, apply_top_k_top_p, sample
from engine.sampling_params import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingParams
from tests.fuzzing import budget

VOCAB = 16
LOGIT = st.floats(-1e6, 1e6, width=32)
TOP_P = st.one_of(
    st.sampled_from([5e-324, 1e-45, 1e-300, 1e-6, 0.5, 1.0 - 1e-12, 1.0]),
    st.floats(0.0, 1.0, exclude_min=True),
)
ROW_PARAMS = st.builds(
    SamplingParams,
    max_tokens=st.just(4),
    temperature=st.one_of(
        st.just(0.0),
        st.sampled_from([MIN_TEMPERATURE, MAX_TEMPERATURE]),
        st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE),
    ),  # fmt: skip
    top_k=st.one_of(st.none(), st.integers(1, VOCAB + 3)),
    top_p=TOP_P,
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    logprobs=st.one_of(st.none(), st.integers(0, VOCAB)),
)


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 4))
    logits = [draw(st.lists(LOGIT, min_size=VOCAB, max_size=VOCAB)) for _ in range(rows)]
    params = [draw(ROW_PARAMS) for _ in range(rows)]
    suppress = [tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=VOCAB - 1, unique=True))) for _ in range(rows)]  # fmt: skip
    seeds = [draw(st.integers(0, 2**63 - 1)) for _ in range(rows)]
    return torch.tensor(logits, dtype=torch.float32), params, suppress, seeds


@budget(200)
@given(batches())
def test_fuzz_sampler_samples_every_finite_row_within_its_set(batch):
    logits, params, suppress, seeds = batch
    masked = logits.clone()
    for i, ids in enumerate(suppress):
        masked[i, list(ids)] = float("-inf")
    out = sample(logits.clone(), params, seeds, suppress, torch.Generator())
    for i, (got, p) in enumerate(zip(out, params, strict=True)):
        assert not isinstance(got, SampleFailure), (p, got)
        assert got.token_id not in suppress[i]
        if p.greedy:
            assert got.token_id == int(torch.argmax(masked[i]))
            continue
        allowed = apply_top_k_top_p(masked[i] / p.temperature, p.top_k, p.top_p)
        assert torch.isfinite(allowed[got.token_id]), (p, got.token_id)
        if p.logprobs is not None:
            assert got.logprobs is not None and got.token_id in got.logprobs


def test_fuzz_top_p_below_float32_resolution_keeps_the_top_token():
    """Regression (found by the gRPC fuzzer): top_p=5e-324 rounds to 0.0 in float32, which
    dropped every token; the row then failed with "probabilities are not finite"."""
    row = torch.tensor([0.5, 2.0, 1.0])
    assert torch.isfinite(apply_top_k_top_p(row, None, 5e-324)).tolist() == [False, True, False]
    params = [SamplingParams(temperature=1.0, top_p=5e-324, seed=1)]
    (got,) = sample(row[None].clone(), params, [1], [()], torch.Generator())
    assert not isinstance(got, SampleFailure) and got.token_id == 1
