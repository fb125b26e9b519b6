"""One owner per engine (DESIGN.md): through real gRPC, every call into a worker's engine
comes from that worker's engine thread, whatever thread served the RPC or moved the KV;
and a transfer's end reaches that thread as an event, never by polling."""

from __future__ import annotations

import threading

import pytest

from proto import worker_pb2 as pb
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.prefill_worker.test_prefill_worker import disagg

from .inproc import GREEDY, serving, spec, start, tokens, wait_all_free

ENGINE_CALLS = (
    "add_request", "reserve", "abort", "admit_prefilled", "release", "step",
    "has_unfinished_requests",
)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_model):
    model = tiny_model("llama")
    workers = [start("decode", model, worker_id="own-d"), start("prefill", model, worker_id="own-p")]  # fmt: skip
    with serving(workers) as stubs:
        yield workers, stubs


def _record(monkeypatch, engine, seen: list[tuple[str, str]]) -> None:
    for name in ENGINE_CALLS:
        real = getattr(engine, name)

        def call(*args, _real=real, _name=name, **kw):
            seen.append((_name, threading.current_thread().name))
            return _real(*args, **kw)

        monkeypatch.setattr(engine, name, call)


def test_only_the_engine_thread_calls_the_engine(pair, tiny_model, monkeypatch):
    (decode_w, prefill_w), (decode, prefill) = pair
    seen: list[tuple[str, str]] = []
    for w in (decode_w, prefill_w):
        _record(monkeypatch, w.worker.engine, seen)
    prompts = make_prompts([26, 9], seed=401)
    got, _, _ = disagg(decode, prefill, "own-1", prompts[0])
    assert got == hf_greedy(tiny_model("llama"), prompts[:1], 12)[0]
    assert tokens(decode.Generate(spec("own-2", prompts[1]))) == hf_greedy(tiny_model("llama"), prompts[1:], 12)[0]  # fmt: skip
    res = decode.Reserve(pb.ReserveRequest(request=spec("own-3", prompts[0]), kv_transport="tcp"))
    assert decode.Abort(pb.AbortRequest(request_id="own-3")).found and res.ticket.block_ids
    stream = decode.Generate(spec("own-4", prompts[1], GREEDY))
    next(stream)
    assert decode.Abort(pb.AbortRequest(request_id="own-4")).found
    wait_all_free([decode, prefill])
    names = {n for _, n in seen}
    assert {c for c, _ in seen} >= {"reserve", "admit_prefilled", "release", "add_request", "abort"}  # fmt: skip
    assert names == {"engine-own-d", "engine-own-p"}, sorted(set(seen) - {s for s in seen if s[1].startswith("engine-")})  # fmt: skip


def test_transfer_ends_reach_the_engine_thread_as_events(pair, tiny_model, monkeypatch):
    """With the workers' timers off (lease checks: the only periodic work left), a
    disaggregated request still completes: the transports' callbacks post each transfer's
    end to its engine thread, which wakes on it; nothing polls transfer states."""
    (decode_w, prefill_w), (decode, prefill) = pair
    for w in (decode_w.worker, prefill_w.worker):
        monkeypatch.setattr(w, "housekeeping", lambda now: None, raising=False)
        monkeypatch.setattr(w.loop, "_housekeeping", lambda: False, raising=False)  # a poller's
    prompt = make_prompts([37], seed=402)[0]
    res = decode.Reserve(pb.ReserveRequest(request=spec("own-ev", prompt), kv_transport="tcp", lease_s=30))  # fmt: skip
    req = pb.PrefillRequest(request=spec("own-ev", prompt), ticket=res.ticket)
    pre = prefill.Prefill(req, timeout=30)
    rest = tokens(decode.Decode(pb.DecodeRequest(request_id="own-ev", first_token=pre.first_token), timeout=30))  # fmt: skip
    assert [pre.first_token.token_id, *rest] == hf_greedy(tiny_model("llama"), [prompt], 12)[0]
    wait_all_free([decode, prefill])
