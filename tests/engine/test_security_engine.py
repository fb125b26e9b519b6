"""One request never takes the engine down: inputs that used to raise inside a batched
step are refused up front (stop ids and top_k past the vocabulary), and a request whose
logits are not finite, or whose bookkeeping raises, fails alone. Every test ends with the
engine serving HF-exact greedy output and every KV block free."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import sample
from engine.scheduler_output import SampledToken
from tests.engine.broken_model import POISON, clean_prompts, nan_token_model
from tests.engine.hf_reference import hf_greedy, make_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def drain(engine) -> dict[str, list]:
    """Step until idle: request id -> [tokens, finish_reason, error]."""
    out: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            rec = out.setdefault(o.request_id, [[], None, None])
            rec[0] += o.new_token_ids
            if o.finished:
                rec[1], rec[2] = o.finish_reason, o.error
    return out


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), num_kv_blocks=32)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=(100000,)),
            r"stop_token_ids contains 100000, outside the vocabulary \[0, 512\)",
        ),
        (
            SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=(7, 512)),
            r"stop_token_ids contains 512, outside the vocabulary \[0, 512\)",
        ),
        (
            SamplingParams(max_tokens=4, top_k=100000),
            r"top_k=100000 exceeds the vocabulary size 512; pass top_k <= 512",
        ),
    ],
)
def test_security_vocab_bounds_refused_and_engine_serves(llm, tiny_model, params, match):
    engine = llm.engine
    good = make_prompts([12], seed=301)[0]
    engine.add_request("ok", good, GREEDY)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", [5, 6, 7], params)
    with pytest.raises(ValueError, match=match):
        engine.reserve("bad-reserve", [5, 6, 7], params)
    edge = SamplingParams(max_tokens=3, top_k=512, stop_token_ids=(511,), seed=1)
    engine.add_request("edge", [5, 6, 7], edge)  # the limits themselves are accepted
    out = drain(engine)
    assert out["ok"][0] == hf_greedy(tiny_model("llama"), [good], 8)[0]
    assert out["edge"][1] in ("length", "stop")
    assert engine.num_free_blocks == engine.layout.num_blocks


def test_security_first_token_outside_vocab_refused(llm):
    engine = llm.engine
    assert engine.reserve("r", [5, 6, 7], GREEDY) is not None
    with pytest.raises(ValueError, match=r"first token id 600 is outside the vocabulary"):
        engine.admit_prefilled("r", 600)
    engine.abort("r")
    assert engine.num_free_blocks == engine.layout.num_blocks


def test_security_sampler_fails_non_finite_rows_alone():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 32, generator=gen) * 3
    logits[1, 4] = float("nan")
    logits[3, 9] = float("inf")
    logits[4] = float("-inf")
    logits[5] = 3e37  # finite, but overflows float32 at temperature 0.01
    hot = SamplingParams(temperature=0.7, top_k=10, seed=3)
    cold = SamplingParams(temperature=0.01)
    params = [GREEDY, GREEDY, hot, hot, GREEDY, cold]
    seeds = [11, 12, 13, 14, 15, 16]
    suppress = [(2, 3), (), (), (5,), (), ()]
    got = sample(logits.clone(), params, seeds, suppress, torch.Generator())
    assert [isinstance(t, SampledToken) for t in got] == [True, False, True, False, False, False]
    reasons = [getattr(t, "reason", "") for t in got]  # the failed rows' SampleFailure
    assert "non-finite logits" in reasons[1] and "non-finite logits" in reasons[4]
    assert "temperature=0.01" in reasons[5]
    good = [0, 2]
    alone = sample(
        logits[good].clone(), [params[i] for i in good], [seeds[i] for i in good],
        [suppress[i] for i in good], torch.Generator(),
    )  # fmt: skip
    assert [got[i] for i in good] == alone
    masked = logits[0].clone()
    masked[[2, 3]] = float("-inf")
    assert got[0].token_id == int(masked.argmax())


def test_security_suppressed_id_outside_vocab_fails_that_row_only():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    got = sample(logits.clone(), [GREEDY, GREEDY], [1, 2], [(40,), ()], torch.Generator())
    assert "40 is outside the vocabulary" in getattr(got[0], "reason", "")
    assert got[1] == SampledToken(int(logits[1].argmax()))


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    return nan_token_model(tiny_model("llama"), tmp_path_factory.mktemp("broken") / "m")


def test_security_nan_logits_fail_one_request_and_batch_goes_on(broken):
    llm = LLM(broken, num_kv_blocks=12)  # small pool: failed requests' blocks get reused
    engine = llm.engine
    good = clean_prompts(broken, [10, 23, 17], seed=302)
    want = hf_greedy(broken, good, 8)
    hot = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    for round_ in range(3):  # each round reuses blocks the poisoned requests held
        batch = {f"g{round_}-{i}": (p, GREEDY) for i, p in enumerate(good)}
        batch[f"nan{round_}"] = ([5, 6, POISON, 7], GREEDY)
        batch[f"nan-hot{round_}"] = ([POISON] + good[1], hot)
        for rid, (prompt, params) in batch.items():
            engine.add_request(rid, prompt, params)
        out = drain(engine)
        assert [out[f"g{round_}-{i}"][0] for i in range(3)] == want
        for rid in (f"nan{round_}", f"nan-hot{round_}"):
            tokens, reason, error = out[rid]
            assert (tokens, reason) == ([], "error")
            assert "non-finite logits (NaN or inf)" in error
        assert engine.num_free_blocks == engine.layout.num_blocks
    (again,) = llm.generate([good[0]], GREEDY)
    assert again.token_ids == want[0] and again.error is None


def test_security_exception_in_one_requests_stop_check_fails_it_alone(llm, tiny_model, monkeypatch):
    engine = llm.engine
    sched = engine.scheduler
    real = sched.stop_status

    def stop_status(req):
        if req.request_id == "victim":
            raise KeyError("injected by the test")
        return real(req)

    monkeypatch.setattr(sched, "stop_status", stop_status)
    prompts = make_prompts([9, 14], seed=303)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("victim", [5, 6, 7], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    out = drain(engine)
    assert out["victim"][1:] == ["error", "internal error while updating the request (KeyError)"]
    assert [out["a"][0], out["b"][0]] == hf_greedy(tiny_model("llama"), prompts, 8)
    assert engine.num_free_blocks == engine.layout.num_blocks
