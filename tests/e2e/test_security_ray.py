"""One request never takes the cluster down, through a served cluster (Ray actors: 1
prefill + 2 decode workers on a checkpoint broken on purpose, a router over real HTTP):
engine-killing inputs get a 400 naming the field, a request whose logits are NaN gets a
clear error while the requests beside it stay HF-exact, and a decode worker whose engine
loop dies (a test-only actor hook) leaves the candidate set within the poll bound while
requests sent meanwhile succeed on the other decode worker (the 503 + Retry-After with
none left is tests/e2e/test_security_health.py); Ray
restarts it with a new epoch and it serves again. KV blocks are all free after each test."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from tests.engine.broken_model import POISON, clean_prompts, nan_token_model
from tests.engine.hf_reference import hf_greedy

from .conftest import MODEL_NAME, Cluster, worker_config
from .faulty_actor import launch_faulty
from .inproc_cluster import candidates, complete, wait_until

BOUND_S = 3.0
"""Router poll interval 0.25 s + one Health RPC, with room for a busy 2-core machine."""


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model, tmp_path_factory):
    model = nan_token_model(tiny_model("llama"), tmp_path_factory.mktemp("broken") / "m")
    config = worker_config(model, transports=("tcp", "shm"))
    c = Cluster(model, launch_faulty(config, "sec-", prefill=1, decode=2))
    try:
        c.refresh()
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def no_leak(cluster):
    yield
    cluster.wait_all_free(timeout=15)


def post(rt, **body) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 4, **body}
    return httpx.post(rt.url + "/v1/completions", json=body, timeout=60)


BAD = [
    (
        {"stop_token_ids": [100000], "min_tokens": 1},
        "token id 100000 is outside the vocabulary [0, 512)",
    ),
    ({"top_k": 100000}, "top_k=100000 exceeds the vocabulary size 512"),
    ({"temperature": 1e-45}, "temperature"),
]


def test_security_engine_killing_inputs_through_the_served_cluster(cluster):
    rt = cluster.router("tcp")
    good = clean_prompts(cluster.model, [14, 29, 21], seed=331)
    want = hf_greedy(cluster.model, good, 8)
    for body, needle in BAD:
        for mode_rt in (rt, cluster.router("aggregated")):
            r = post(mode_rt, **body)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    results = {}

    def send(key, prompt):
        results[key] = complete(rt, prompt)

    jobs = [("g0", good[0]), ("nan", [5, POISON, 6] + good[1]), ("g1", good[1])]
    threads = [threading.Thread(target=send, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    nan = results["nan"]
    assert nan.status_code in (500, 502), nan.text
    assert "non-finite logits (NaN or inf)" in nan.json()["error"]["message"]
    assert "Traceback" not in nan.text
    for i, key in enumerate(("g0", "g1")):
        assert results[key].json()["choices"][0]["token_ids"] == want[i]
    assert complete(rt, good[2]).json()["choices"][0]["token_ids"] == want[2]


def test_security_dead_engine_loop_on_ray_is_routed_around_and_restarted(cluster):
    import ray

    rt = cluster.router("ray")
    prompts = clean_prompts(cluster.model, [18, 24, 31, 16, 27, 22], seed=332)
    want = hf_greedy(cluster.model, prompts, 8)
    wait_until(lambda: candidates(rt, "decode") == {"sec-decode-0", "sec-decode-1"}, 30)
    assert complete(rt, prompts[0]).json()["choices"][0]["token_ids"] == want[0]
    old = cluster.infos["sec-decode-0"]
    reason = ray.get(cluster.workers.actors["sec-decode-0"].kill_engine_loop.remote(), timeout=30)
    outcomes = []  # requests sent while the router may still route to the dead worker

    def send() -> None:
        for i in range(1, 5):
            start = time.monotonic()
            r = complete(rt, prompts[i], timeout=60)
            outcomes.append((i, r, time.monotonic() - start))

    sender = threading.Thread(target=send)
    sender.start()
    took = wait_until(lambda: "sec-decode-0" not in candidates(rt, "decode"), BOUND_S)
    logging.getLogger(__name__).info("dead decode worker left the candidate set in %.2fs", took)
    sender.join(120)
    assert len(outcomes) == 4, "a request hung"
    assert "the engine loop failed: RuntimeError: injected" in reason
    for i, r, elapsed in outcomes:  # decode-1 still serves: every one succeeds there
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want[i]
        assert elapsed < 30, f"request {i} took {elapsed:.1f}s"
    # Ray restarts the actor (the process exited 1); the router follows the new incarnation.
    wait_until(lambda: _restarted(cluster, old), 120, "decode-0 restarted by Ray")
    wait_until(lambda: candidates(rt, "decode") == {"sec-decode-0", "sec-decode-1"}, 30)
    assert rt.router.state.get("sec-decode-0").epoch != old["epoch"]
    assert complete(rt, prompts[5]).json()["choices"][0]["token_ids"] == want[5]


def _restarted(cluster: Cluster, old: dict) -> bool:
    info = cluster.workers.info_sync("sec-decode-0")
    if info is None or info["epoch"] == old["epoch"]:
        return False
    cluster.refresh()
    return True
