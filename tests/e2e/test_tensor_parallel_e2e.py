"""Disaggregated serving through the router with TP=2 groups on Ray (gloo): a prefill and a
decode worker of two ranks each (leader + follower actor in one placement group), greedy
output equal to HF, /health listing their tp_size; a follower killed mid-decode fails the
in-flight request within 20 s naming the rank, no KV block stays held, and the group
comes back (Ray restarts the leader, which starts a fresh group)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
import ray

from engine.config import ParallelConfig
from router.launch.ray_launcher import RayWorkers
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.waiting import Threads

from .conftest import MODEL_NAME, Cluster, client, worker_config
from .group_faults import EXTRA, GREEDY, MAX_NEW, greedy_once_recovered, kill_mid_stream, wait_gone

pytestmark = pytest.mark.slow  # two TP=2 groups on Ray


@pytest.fixture(scope="module")
def tp_cluster(ray_session, tiny_model):
    base = worker_config(tiny_model("llama"), transports=("tcp", "shm"))
    config = replace(base, engine=replace(base.engine, parallel=ParallelConfig(tp_size=2)))
    workers = RayWorkers()
    workers.launch("prefill", 1, config, prefix="tp-")
    workers.launch("decode", 1, config, prefix="tp-")
    cluster = Cluster(tiny_model("llama"), workers)
    cluster.refresh()
    yield cluster
    cluster.stop()


def _pids(cluster: Cluster, wid: str) -> list[int]:
    return ray.get(cluster.workers.actors[wid].rank_pids.remote())


def test_tensor_parallel_ray_groups_equal_hf(tp_cluster, tiny_model):
    rt = tp_cluster.router("ray")
    c = client(rt)
    prompts = make_prompts([23, 40, 7, 31], seed=85)
    want = hf_greedy(tiny_model("llama"), prompts, MAX_NEW)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out = c.completions.create(model=MODEL_NAME, prompt=prompts[i], **GREEDY, extra_body=EXTRA)  # fmt: skip
        got[i] = out.choices[0].token_ids

    threads = Threads()
    for i in range(len(prompts)):
        threads.start(run, i)
    threads.join(timeout=120)
    assert [got.get(i) for i in range(len(prompts))] == want
    workers = httpx.get(rt.url + "/health").json()["workers"]
    assert {w: (v["role"], v["tp_size"]) for w, v in workers.items()} == {
        "tp-prefill-0": ("prefill", 2),
        "tp-decode-0": ("decode", 2),
    }
    assert len(_pids(tp_cluster, "tp-decode-0")) == 2
    tp_cluster.wait_all_free()


def test_tensor_parallel_dead_rank_fails_cleanly_then_recovers(tp_cluster, tiny_model):
    rt = tp_cluster.router("ray")
    c = client(rt, timeout=60)
    prompt = make_prompts([30], seed=86)[0]
    want = hf_greedy(tiny_model("llama"), [prompt], MAX_NEW)[0]
    pids = _pids(tp_cluster, "tp-decode-0")
    kill_mid_stream(c, prompt, pids[1], f"TP rank 1 (pid {pids[1]}) died")
    wait_gone(pids[:1], timeout=30)  # the leader exits; Ray restarts it with a fresh group
    assert greedy_once_recovered(c, prompt, "decode TP group") == want
    tp_cluster.refresh()
    assert len(set(_pids(tp_cluster, "tp-decode-0")) & set(pids)) == 0  # every rank is new
    tp_cluster.wait_all_free()
