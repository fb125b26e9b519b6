"""Two routers sharing a real redis-server in front of 1 prefill + 2 decode in-process
workers: prefix-aware routing across routers, a worker killed and restarted (new epoch),
redis-server restarted mid-run, and a worker of another KV layout refused."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from router.redis_state import RedisClusterState
from router.serve import state_source
from router.server import Router
from router.service import RouterConfig
from tests.decode_worker.inproc import start, stub, wait_all_free
from tests.redis_server import RedisServer

TTL_S, POLL_S = 3.0, 0.2  # a loaded CI box can stall a poll loop past 1 s
PREFIX_TOKENS = 64  # 4 blocks of 16


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()  # also when the cluster below fails to start


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server):
    model, server = tiny_model("llama"), redis_server
    env = {"server": server, "workers": {}, "model": model, "routers": []}
    try:
        for role, wid in (("prefill", "p0"), ("decode", "d0"), ("decode", "d1")):
            env["workers"][wid] = start(role, model, worker_id=wid)
        cfg = RouterConfig(str(model), "m", local_prefill_tokens=16)

        def state():
            return RedisClusterState(server.url, heartbeat_ttl_s=TTL_S, retry_s=0.3)

        env["state"] = state
        addresses = [w.address for w in env["workers"].values()]
        first = Router(cfg, addresses, state=state(), poll_interval_s=POLL_S)
        second_state = state()  # router-only: finds the workers in Redis
        second = Router(cfg, state_source(second_state), state=second_state, poll_interval_s=POLL_S)  # fmt: skip
        env["routers"] += [first.start_in_thread(), second.start_in_thread()]
        wait_until(lambda: len(second.state.workers()) == 3 and len(second.registry.clients) == 3)
        yield env
    finally:
        for rt in env["routers"]:
            rt.stop()
        for w in env["workers"].values():
            w.stop()


@pytest.fixture(autouse=True)
def _no_leaked_blocks(cluster):
    yield
    stubs = [stub(w) for w in cluster["workers"].values()]
    wait_all_free([s for s, _ in stubs])
    for _, channel in stubs:
        channel.close()


def wait_until(cond, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def complete(rt, prompt: list[int]) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def prefix_routed(rt) -> float:
    for line in httpx.get(rt.url + "/metrics").text.splitlines():
        if line.startswith('pdserve_routing_decisions_total{path="local",reason="prefix_cached"}'):
            return float(line.split()[-1])
    return 0.0


def test_two_routers_share_prefix_index(cluster):
    routers, hits, follow_ups = cluster["routers"], 0, 0
    for g in range(3):
        prefix = [100 + 37 * g + i % 50 for i in range(PREFIX_TOKENS)]
        for i in range(5):
            out = complete(routers[i % 2], prefix + [7 + i, 8 + g, 9, 10, 11, 12, 13, 14])
            if i:
                follow_ups += 1
                hits += out["usage"]["prompt_tokens_details"]["cached_tokens"] >= PREFIX_TOKENS
    assert hits / follow_ups >= 0.9, f"prefix hit rate {hits}/{follow_ups}"
    # and each router chose the worker from the shared index (its own would miss the
    # first follow-up it sees of every prefix)
    assert sum(prefix_routed(rt) for rt in routers) >= 0.9 * follow_ups
    for rt in routers:
        health = httpx.get(rt.url + "/health").json()
        assert health["cluster_state"]["connected"] is True and len(health["workers"]) == 3


def test_restarted_router_loses_nothing(cluster):
    prefixes = [[200 + 29 * g + i % 40 for i in range(PREFIX_TOKENS)] for g in range(3)]
    for g, prefix in enumerate(prefixes):
        complete(cluster["routers"][0], prefix + [g, 1, 2, 3, 4, 5, 6, 7])
    state = cluster["state"]()  # a new router process: nothing in memory
    fresh = Router(cluster["routers"][0].router.config, state_source(state), state=state)
    rt = fresh.start_in_thread()
    try:
        wait_until(lambda: len(fresh.registry.clients) == 3)
        for g, prefix in enumerate(prefixes):
            out = complete(rt, prefix + [g, 9, 9, 9, 9, 9, 9, 9])
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= PREFIX_TOKENS
        # routed on the shared prefix index (an empty index would prefill remotely)
        assert prefix_routed(rt) == 3
    finally:
        rt.stop()


def test_killed_worker_leaves_and_rejoins_with_new_epoch(cluster):
    view = cluster["state"]()
    old = view.get("d1").epoch
    address = cluster["workers"]["d1"].address
    cluster["workers"].pop("d1").stop()
    took = wait_until(lambda: [w.worker_id for w in view.workers("decode")] == ["d0"])
    assert took <= TTL_S + 2 * POLL_S
    for i in range(4):
        complete(cluster["routers"][i % 2], [5, 6, 7, i])
    port = int(address.rsplit(":", 1)[1])
    cluster["workers"]["d1"] = start("decode", cluster["model"], worker_id="d1", port=port)
    wait_until(lambda: (w := view.get("d1")) is not None and w.healthy and w.epoch != old)
    for rt in cluster["routers"]:
        wait_until(lambda rt=rt: rt.router.registry.epochs.get("d1") == view.get("d1").epoch)
    # both decode workers take requests again (the cost model spreads concurrent load)
    for i in range(4):
        complete(cluster["routers"][i % 2], [9, 9, i])


def test_redis_restart_keeps_serving_and_resyncs(cluster):
    server, routers = cluster["server"], cluster["routers"]
    server.stop()
    for i in range(4):
        complete(routers[i % 2], [3, 1, 4, 1, 5, i])
    for rt in routers:
        assert httpx.get(rt.url + "/health").json()["cluster_state"]["connected"] is False
        assert "pdserve_cluster_state_connected 0.0" in httpx.get(rt.url + "/metrics").text
    server.start()  # empty: no persistence
    view = cluster["state"]()
    wait_until(lambda: len(view.workers()) == 3, timeout=10)
    for i in range(4):
        complete(routers[i % 2], [2, 7, 1, 8, i])
    for rt in routers:
        assert httpx.get(rt.url + "/health").json()["cluster_state"]["connected"] is True


def test_mismatched_layout_refused_with_reason(cluster, caplog):
    odd = start("prefill", cluster["model"], block_size=32, worker_id="p32")
    try:
        state = cluster["state"]()
        router = Router(RouterConfig(str(cluster["model"]), "m"), [odd.address], state=state)
        with caplog.at_level(logging.ERROR, logger="router.workers"):
            rt = router.start_in_thread()
        rt.stop()
        assert [r.worker_id for r in router.registry.refused] == ["p32"]
        assert "block_size mismatch: cluster=16, p32=32" in caplog.text
        assert "p32" not in {w.worker_id for w in state.workers(healthy_only=False)}
    finally:
        odd.stop()
