"""Ray-launched workers with a shared Redis state (the ``pdserve serve --redis-url`` path):
the actors register and publish themselves (``WorkerConfig.state.redis_url``); a router that
finds workers only in Redis serves HF-equal output through disaggregated prefill; a decode
actor killed with SIGKILL leaves the registry, Ray restarts it with a new epoch, it
registers itself again and requests keep succeeding."""

from __future__ import annotations

import os
import signal

import pytest

from engine.config import StateConfig
from engine.config.router import RouterConfig
from router.server import Router
from router.state.redis import RedisClusterState
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.redis_server import RedisServer

from .conftest import MODEL_NAME, launch
from .test_faults import greedy
from .test_redis_cluster import left_within_bound, wait_until

TTL_S = 2.0


@pytest.fixture(scope="module")
def redis_ray(ray_session, tiny_model):
    server = RedisServer().start()
    cluster = None
    try:
        model = tiny_model("llama")
        state = StateConfig(server.url, heartbeat_ttl_s=TTL_S)
        cluster = launch(model, prefix="rr-", state=state)
        state = RedisClusterState(server.url, retry_s=0.3)
        router = Router(
            RouterConfig(str(model), MODEL_NAME, kv_transport="tcp", local_prefill_tokens=16),
            [],
            state=state,
            discover=True,
            poll_interval_s=0.2,
        ).start_in_thread()
        cluster.routers.append(router)
        yield cluster, RedisClusterState(server.url), router
    finally:
        if cluster is not None:
            cluster.stop()
        server.close()


def _registered(view: RedisClusterState) -> dict[str, int]:
    """worker_id -> epoch of the healthy workers in Redis."""
    return {w.worker_id: w.epoch for w in view.workers()}


def test_ray_workers_register_themselves_and_serve(redis_ray, tiny_model):
    cluster, view, router = redis_ray
    wait_until(lambda: set(_registered(view)) == {"rr-prefill-0", "rr-decode-0"}, timeout=30)
    records = {w.worker_id: w for w in view.workers()}
    for wid, info in cluster.infos.items():
        assert records[wid].address == info["address"]
        assert records[wid].role == info["role"]
        assert records[wid].epoch == info["epoch"]
        assert records[wid].ep_size == 1
    wait_until(lambda: len(router.router.state.workers()) == 2, timeout=10)
    prompts = make_prompts([40, 25], seed=171)
    got = [greedy(router, p) for p in prompts]
    assert got == hf_greedy(tiny_model("llama"), prompts, 8)
    cluster.wait_all_free()


def test_killed_ray_decode_worker_rejoins_with_new_epoch(redis_ray, tiny_model):
    cluster, view, router = redis_ray
    cluster.refresh()
    old = cluster.infos["rr-decode-0"]
    wait_until(lambda: _registered(view).get("rr-decode-0") == old["epoch"], timeout=30)
    os.kill(old["pid"], signal.SIGKILL)
    # The old incarnation leaves when its TTL lapses, unless Ray's restart registered the
    # new one first (which replaces it): either way its epoch is gone within the bound.
    gone = wait_until(lambda: _registered(view).get("rr-decode-0") != old["epoch"], timeout=TTL_S + 10)  # fmt: skip
    left_within_bound(gone, TTL_S)
    # Ray restarts the actor; the new incarnation registers itself with a new epoch.
    wait_until(
        lambda: _registered(view).get("rr-decode-0", old["epoch"]) != old["epoch"], timeout=90
    )
    cluster.refresh()
    new = cluster.infos["rr-decode-0"]
    assert new["epoch"] != old["epoch"] and _registered(view)["rr-decode-0"] == new["epoch"]
    prompt = make_prompts([33], seed=172)[0]
    wait_until(
        lambda: any(w.epoch == new["epoch"] for w in router.router.state.workers()), timeout=10
    )
    assert greedy(router, prompt) == hf_greedy(tiny_model("llama"), [prompt], 8)[0]
    cluster.wait_all_free()
