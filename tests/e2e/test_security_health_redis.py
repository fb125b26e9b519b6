"""Issue 13's acceptance in Redis mode (the in-memory mode: test_security_health.py): a
real router discovering its workers from a real redis-server, in front of in-process
workers that publish themselves. A decode worker whose engine loop dies (a test hook
makes its step raise; its process exit is replaced by a hook) stops heartbeating and
leaves the router's candidate set within the heartbeat bound; requests sent meanwhile
succeed on the remaining worker, HF-exact; the dead one asks to exit 1 and its
restart (what Ray or a supervisor does: a new process, same worker id) registers a new
epoch and serves again; with every decode worker dead, requests and ``/health`` answer
503 with ``Retry-After``, never a hang."""

from __future__ import annotations

import threading

import httpx
import pytest

from router.server import Router
from router.service import RouterConfig
from router.state.redis import RedisClusterState
from tests.decode_worker.inproc import start
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.redis_server import RedisServer
from tests.router.fuzz_cluster import assert_nothing_held

from .conftest import MODEL_NAME
from .inproc_cluster import Exits, candidates, complete, kill_loop, wait_until

TTL_S = 1.0
BOUND_S = TTL_S + 2.5
"""The heartbeat TTL, one router discovery poll (0.2 s) and slack for a busy machine."""


@pytest.fixture
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.close()


@pytest.fixture
def workers(tiny_model, redis_url):
    started = {}

    def make(role: str, wid: str):
        w = start(role, tiny_model("llama"), worker_id=wid, redis_url=redis_url, heartbeat_ttl_s=TTL_S)  # fmt: skip
        started[wid] = w
        return w

    yield make, started
    for w in started.values():
        w.stop()


def _send(rt, prompts, results: dict) -> list[threading.Thread]:
    def one(i):
        results[i] = complete(rt, prompts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


def test_security_dead_loop_in_redis_mode_leaves_then_rejoins_and_503_when_none(
    workers, tiny_model, redis_url, monkeypatch
):
    make, started = workers
    exits = Exits(monkeypatch)
    make("prefill", "p"), make("decode", "d0"), make("decode", "d1")
    d0 = started["d0"]
    cfg = RouterConfig(str(tiny_model("llama")), MODEL_NAME, kv_transport="tcp")
    state = RedisClusterState(redis_url, retry_s=0.3)
    rt = Router(cfg, [], state=state, discover=True, poll_interval_s=0.2).start_in_thread()
    prompts = make_prompts([18, 25, 22, 29, 16], seed=371)
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    try:
        wait_until(lambda: candidates(rt, "decode") == {"d0", "d1"}, 15, "both registered")
        epoch = {w.worker_id: w.epoch for w in rt.router.state.workers()}["d0"]
        kill_loop(d0, monkeypatch)
        results: dict[int, httpx.Response] = {}
        threads = _send(rt, prompts[:2], results)  # while d0 may still be a candidate
        took = wait_until(lambda: candidates(rt, "decode") == {"d1"}, BOUND_S, "d0 dropped")
        for t in threads:
            t.join(60)
        assert [results[i].json()["choices"][0]["token_ids"] for i in (0, 1)] == want[:2]
        wait_until(lambda: exits.codes == [1], 10, "d0 asked to exit 1")
        started.pop("d0").stop()  # the process ends; its supervisor starts it again:
        make("decode", "d0")
        wait_until(lambda: candidates(rt, "decode") == {"d0", "d1"}, 15, "d0 rejoined")
        assert {w.worker_id: w.epoch for w in rt.router.state.workers()}["d0"] != epoch
        assert complete(rt, prompts[2]).json()["choices"][0]["token_ids"] == want[2]
        assert_nothing_held(rt, list(started.values()))
        for wid in ("d0", "d1"):
            kill_loop(started[wid], monkeypatch)
        wait_until(lambda: not candidates(rt, "decode"), BOUND_S, "every decode worker dropped")
        r = complete(rt, prompts[3], timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        health = httpx.get(rt.url + "/health", timeout=5)
        assert health.status_code == 503 and health.headers["retry-after"]
        assert took <= BOUND_S
        wait_until(lambda: exits.codes == [1, 1, 1], 10, "both asked to exit 1")
    finally:
        rt.stop()
