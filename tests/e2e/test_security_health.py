"""Health is the engine loop's real state. In-process workers over real gRPC behind a real
router: a worker whose loop dies (a test hook makes its batch step raise) fails its
streams, asks to exit non-zero, answers Health ``serving: false`` and refuses new work with
UNAVAILABLE; the router drops it from the candidate set within its poll bound, requests
meanwhile succeed on the remaining workers, and with no decode worker left ``/health`` and
requests answer 503 with ``Retry-After``. A stalled loop (a step that never returns) is
reported and routed around the same way, and rejoins when it moves again."""

from __future__ import annotations

import threading

import grpc
import httpx
import pytest

from proto import worker_pb2 as pb
from tests.decode_worker.inproc import GREEDY, spec, start, stub, tokens, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts

from .inproc_cluster import Exits, candidates, complete, kill_loop, router, stall_loop, wait_until

BOUND_S = 3.0
"""Poll interval 0.2 s + one Health RPC, with room for a busy 2-core machine."""


@pytest.fixture
def workers(tiny_model):
    started = {}

    def make(role: str, wid: str, **kw):
        started[wid] = start(role, tiny_model("llama"), worker_id=wid, **kw)
        return started[wid]

    yield make
    for w in started.values():
        w.stop()


def test_security_dead_loop_leaves_candidates_and_503_when_none_left(
    workers, tiny_model, monkeypatch
):
    exits = Exits(monkeypatch)
    p, d0, d1 = workers("prefill", "p"), workers("decode", "d0"), workers("decode", "d1")
    rt = router(tiny_model("llama"), [p, d0, d1], kv_transport="tcp")
    prompts = make_prompts([20, 27, 31, 18, 25], seed=311)
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    try:
        assert complete(rt, prompts[0]).json()["choices"][0]["token_ids"] == want[0]
        s0, ch0 = stub(d0)
        long = s0.Generate(spec("inflight", [5, 6, 7], GREEDY.__class__(max_tokens=1500, temperature=0.0, ignore_eos=True)), timeout=30)  # fmt: skip
        next(long)  # d0 is generating this when its loop dies
        kill_loop(p, monkeypatch)
        kill_loop(d0, monkeypatch)
        with pytest.raises(grpc.RpcError) as err:
            list(long)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the engine loop of d0 failed (RuntimeError: injected" in err.value.details()
        h = s0.Health(pb.HealthRequest(), timeout=5)
        assert (h.serving, h.loop_alive) == (False, False) and "injected" in h.reason
        with pytest.raises(grpc.RpcError) as err:  # new work is refused, not queued forever
            list(s0.Generate(spec("late", [5, 6, 7]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ch0.close()
        results = {}  # sent while the router may still route to the dead workers

        def send(i):
            results[i] = complete(rt, prompts[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        took = wait_until(lambda: candidates(rt, "decode") == {"d1"}, BOUND_S, "d0 dropped")
        wait_until(lambda: not candidates(rt, "prefill"), BOUND_S, "p dropped")
        for t in threads:
            t.join(60)
        for i in (1, 2):
            assert results[i].status_code == 200, results[i].text
            assert results[i].json()["choices"][0]["token_ids"] == want[i]
        assert complete(rt, prompts[3]).json()["choices"][0]["token_ids"] == want[3]
        wait_until(lambda: exits.codes == [1, 1], 10, "both dead workers asked to exit 1")
        wait_all_free([stub(d1)[0]])
        kill_loop(d1, monkeypatch)
        wait_until(lambda: not candidates(rt, "decode"), BOUND_S, "d1 dropped")
        health = httpx.get(rt.url + "/health", timeout=5)
        assert health.status_code == 503 and health.headers["retry-after"]
        assert health.json()["workers"]["d1"]["healthy"] is False
        r = complete(rt, prompts[4], timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert took <= BOUND_S
        wait_until(lambda: exits.codes == [1, 1, 1], 10, "d1 asked to exit 1")
    finally:
        rt.stop()


def test_security_stalled_loop_is_routed_around_and_rejoins(workers, tiny_model, monkeypatch):
    d0 = workers("decode", "d0", stall_timeout_s=0.5)
    d1 = workers("decode", "d1")
    rt = router(tiny_model("llama"), [d0, d1])
    prompts = make_prompts([15, 22, 19], seed=312)
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    s0, ch0 = stub(d0)
    try:
        wait_until(lambda: candidates(rt, "decode") == {"d0", "d1"}, BOUND_S, "both serving")
        release = stall_loop(d0, monkeypatch)
        stuck: dict[str, list[int]] = {}
        t = threading.Thread(target=lambda: stuck.setdefault("ids", tokens(s0.Generate(spec("stuck", prompts[0]), timeout=60))))  # fmt: skip
        t.start()
        wait_until(lambda: not s0.Health(pb.HealthRequest(), timeout=5).serving, 10, "stall seen")
        h = s0.Health(pb.HealthRequest(), timeout=5)
        assert h.loop_alive and h.has_work and h.seconds_since_step > 0.5
        assert "has not completed a step for" in h.reason
        wait_until(lambda: candidates(rt, "decode") == {"d1"}, BOUND_S, "d0 dropped")
        assert complete(rt, prompts[1]).json()["choices"][0]["token_ids"] == want[1]
        with pytest.raises(grpc.RpcError) as err:
            s0.Generate(spec("refused", [5, 6]), timeout=10).next()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:  # answers, rather than waiting on the step
            s0.Stats(pb.StatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not completed a step for" in err.value.details()
        release.set()
        t.join(60)
        assert stuck["ids"] == hf_greedy(tiny_model("llama"), [prompts[0]], 12)[0]
        wait_until(lambda: candidates(rt, "decode") == {"d0", "d1"}, BOUND_S, "d0 back")
        assert s0.Health(pb.HealthRequest(), timeout=5).serving
        assert complete(rt, prompts[2]).json()["choices"][0]["token_ids"] == want[2]
        wait_all_free([s0, stub(d1)[0]])
    finally:
        ch0.close()
        rt.stop()
