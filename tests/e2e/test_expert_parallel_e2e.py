"""Disaggregated serving through the router with EP=2 on the decode side (Ray, gloo).

Prefill EP=1, decode EP=2 (leader + follower actor in one placement group): greedy output
equals HF for the tiny MoE models, no KV block leaks, a dead follower fails the group
cleanly (no hang; the leader restarts with a fresh group), and every EP process exits when
the workers stop.
"""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from router.launch.ray_launcher import RayWorkers
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.waiting import Threads

from .conftest import MODEL_NAME, Cluster, client, worker_config
from .group_faults import EXTRA, GREEDY, MAX_NEW, greedy_once_recovered, kill_mid_stream, wait_gone

pytestmark = pytest.mark.slow  # three EP=2 clusters on Ray


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def ep_cluster(request, ray_session, tiny_model):
    arch = request.param
    config = worker_config(tiny_model(arch), transports=("tcp",), ep_size=2)
    workers = RayWorkers()
    workers.launch("prefill", 1, config, prefix=f"ep-{arch}-")
    workers.launch("decode", 1, config, prefix=f"ep-{arch}-")
    cluster = Cluster(tiny_model(arch), workers)
    cluster.refresh()
    pids = ray.get(workers.actors[f"ep-{arch}-decode-0"].ep_pids.remote())
    prefill_pids = ray.get(workers.actors[f"ep-{arch}-prefill-0"].ep_pids.remote())
    yield arch, cluster, pids
    cluster.stop()
    wait_gone(pids + prefill_pids)


def test_prefill_ep2_decode_ep2_equals_hf(ep_cluster, tiny_model):
    arch, cluster, pids = ep_cluster
    assert len(pids) == 2
    rt = cluster.router("tcp")
    c = client(rt)
    prompts = make_prompts([23, 40, 7, 31, 12, 18], seed=81)
    want = hf_greedy(tiny_model(arch), prompts, MAX_NEW)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out = c.completions.create(model=MODEL_NAME, prompt=prompts[i], **GREEDY, extra_body=EXTRA)  # fmt: skip
        got[i] = out.choices[0].token_ids

    run(0)  # alone: homed on rank 0
    threads = Threads()
    for i in range(1, len(prompts)):  # together: both ranks hold sequences on both workers
        threads.start(run, i)
    threads.join(timeout=120)
    assert [got.get(i) for i in range(len(prompts))] == want
    cluster.wait_all_free()
    _check_expert_metrics(rt, f"ep-{arch}-decode-0")
    _check_expert_metrics(rt, f"ep-{arch}-prefill-0")


def _check_expert_metrics(rt, worker: str) -> None:
    """The router exports the decode EP worker's load per rank and expert."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(rt.url + "/metrics").text
        lines = [ln for ln in text.splitlines() if f'worker="{worker}"' in ln]
        rank1 = [ln for ln in lines if ln.startswith("pdserve_expert_rank_tokens") and 'rank="1"' in ln]  # fmt: skip
        if rank1 and float(rank1[0].split()[-1]) > 0:
            break
        assert time.monotonic() < deadline, "no expert load metrics for " + worker
        time.sleep(0.25)
    balance = [ln for ln in lines if ln.startswith("pdserve_expert_balancedness")]
    assert {ln.split('level="')[1].split('"')[0] for ln in balance} == {"expert", "rank"}
    assert all(0 < float(ln.split()[-1]) <= 1 for ln in balance)
    assert sum(ln.startswith("pdserve_expert_tokens{") for ln in lines) == 4


def test_follower_death_fails_cleanly_then_recovers(ep_cluster, tiny_model):
    arch, cluster, pids = ep_cluster
    if arch != "qwen3_moe":
        pytest.skip("fault injection runs on one architecture")
    rt = cluster.router("ray")
    c = client(rt, timeout=60)
    prompt = make_prompts([30], seed=82)[0]
    want = hf_greedy(tiny_model(arch), [prompt], MAX_NEW)[0]
    kill_mid_stream(c, prompt, pids[1], f"EP rank 1 (pid {pids[1]}) died")
    wait_gone(pids[:1], timeout=30)  # the leader exits; Ray restarts it with new ranks
    assert greedy_once_recovered(c, prompt, "decode EP group") == want
    cluster.refresh()
    leader = cluster.workers.actors[f"ep-{arch}-decode-0"]
    pids[:] = ray.get(leader.ep_pids.remote())
    cluster.wait_all_free()
