"""One request never takes a worker down, over real gRPC (in-process workers, no router):
engine-killing inputs sent straight to the workers are INVALID_ARGUMENT; a request whose
logits are NaN (a checkpoint broken on purpose) or whose output handling raises fails
alone with INTERNAL, its KV blocks freed on both workers; afterwards both still serve
HF-exact greedy output and their Health says serving."""

from __future__ import annotations

import threading

import grpc
import pytest

import decode_worker.worker as decode_mod
from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb
from tests.engine.broken_model import POISON, clean_prompts, nan_token_model
from tests.engine.hf_reference import hf_greedy

from .inproc import serving, spec, start, tokens, wait_all_free

T = 30  # every call has a deadline: on a dead engine loop it would wait forever


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    return nan_token_model(tiny_model("llama"), tmp_path_factory.mktemp("broken") / "m")


@pytest.fixture(scope="module")
def pair(broken):
    workers = [start("decode", broken, worker_id="d"), start("prefill", broken, worker_id="p")]
    with serving(workers) as stubs:
        yield stubs


@pytest.fixture(autouse=True)
def serving_and_no_leak(pair, broken):
    yield
    decode, prefill = pair
    prompt = clean_prompts(broken, [13], seed=321)[0]
    got = tokens(decode.Generate(spec(f"after-{threading.get_ident()}", prompt), timeout=T))
    assert got == hf_greedy(broken, [prompt], 12)[0]
    for s in pair:
        assert s.Health(pb.HealthRequest(), timeout=5).serving
    wait_all_free(pair)


def bad_spec(rid: str, **fields) -> pb.RequestSpec:
    msg = spec(rid, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
    for name, value in fields.items():
        if name == "stop_token_ids":
            msg.params.stop_token_ids.extend(value)
        else:
            setattr(msg.params, name, value)
    return msg


BAD = {
    "stop id past vocab, min_tokens": (
        {"stop_token_ids": [100000], "min_tokens": 1},
        "stop_token_ids contains 100000",
    ),  # fmt: skip
    "top_k past vocab": ({"top_k": 100000}, "top_k=100000 exceeds the vocabulary size 512"),
    "temperature 1e-45": ({"temperature": 1e-45}, "temperature must be 0 (greedy) or in [0.01"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_security_engine_killing_inputs_are_invalid_argument(pair, case):
    decode, prefill = pair
    fields, needle = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Generate(bad_spec("gen", **fields), timeout=T))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(pb.ReserveRequest(request=bad_spec("res", **fields), kv_transport="tcp"), timeout=T)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    res = decode.Reserve(pb.ReserveRequest(request=spec("ok", [5, 6, 7]), kv_transport="tcp"), timeout=T)  # fmt: skip
    req = pb.PrefillRequest(request=bad_spec("ok", **fields), ticket=res.ticket)
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(req, timeout=T)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    decode.Abort(pb.AbortRequest(request_id="ok"), timeout=T)


def test_security_decode_first_token_past_vocab_is_invalid_argument(pair, broken):
    decode, prefill = pair
    prompt = clean_prompts(broken, [20], seed=322)[0]
    res = decode.Reserve(pb.ReserveRequest(request=spec("ft", prompt), kv_transport="tcp"), timeout=T)  # fmt: skip
    prefill.Prefill(pb.PrefillRequest(request=spec("ft", prompt), ticket=res.ticket), timeout=T)
    bad = pb.DecodeRequest(request_id="ft", first_token=pb.Token(token_id=600))
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(bad, timeout=T))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first token id 600 is outside the vocabulary [0, 512)" in err.value.details()
    decode.Abort(pb.AbortRequest(request_id="ft"), timeout=T)


def test_security_nan_request_fails_alone_on_both_workers(pair, broken):
    decode, prefill = pair
    good = clean_prompts(broken, [11, 26], seed=323)
    poison = [5, POISON, 6, 7] + good[0]
    results: dict[str, object] = {}

    def run(rid, prompt):
        try:
            results[rid] = tokens(decode.Generate(spec(rid, prompt), timeout=T))
        except grpc.RpcError as exc:
            results[rid] = exc

    threads = [threading.Thread(target=run, args=a) for a in [("g0", good[0]), ("bad", poison), ("g1", good[1])]]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results["g0"], results["g1"]] == hf_greedy(broken, good, 12)
    err = results["bad"]
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INTERNAL
    assert "request bad failed on d: the model produced non-finite logits" in err.details()
    res = decode.Reserve(pb.ReserveRequest(request=spec("pbad", poison), kv_transport="tcp"), timeout=T)  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(pb.PrefillRequest(request=spec("pbad", poison), ticket=res.ticket), timeout=T)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "request pbad failed on p: the model produced non-finite logits" in err.value.details()
    # No Abort needed: P holds its last layer back until the first token is sampled, so D's
    # transfer never completed and D freed the reservation (tests/prefill_worker/
    # test_security_first_token.py); the autouse fixture checks every block is free.


def test_security_output_handling_error_fails_one_stream(pair, broken, monkeypatch):
    decode, _ = pair
    real = decode_mod.chunk_from_output

    def chunk_from_output(out, num_top, *prompt):
        if out.request_id == "victim" and out.num_output_tokens == 3:
            raise IndexError("injected by the test")
        return real(out, num_top, *prompt)

    monkeypatch.setattr(decode_mod, "chunk_from_output", chunk_from_output)
    good = clean_prompts(broken, [9, 17], seed=324)
    calls = {rid: decode.Generate(spec(rid, p), timeout=T) for rid, p in [("a", good[0]), ("victim", good[0]), ("b", good[1])]}  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        list(calls.pop("victim"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "request victim failed on d: internal error (IndexError)" in err.value.details()
    assert [tokens(c) for c in calls.values()] == hf_greedy(broken, good, 12)
