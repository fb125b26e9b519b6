"""Faults on a dedicated cluster whose prefill worker is slow (a test-only gRPC interceptor): remote prefill
killed mid-request or timing out falls back to local prefill on the decode worker; Ray
restarts the dead worker and the router registers its new incarnation."""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import pytest

from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.waiting import Threads, wait_until

from .conftest import MODEL_NAME, Cluster, client, worker_config
from .faulty_actor import SlowPrefillActor, launch_actors
from .test_parity import routed

DELAY_S = 2.0


@pytest.fixture(scope="module")
def slow(ray_session, tiny_model):
    model = tiny_model("llama")
    workers = launch_actors(SlowPrefillActor, worker_config(model), "fault-", 1, 1, DELAY_S)
    cluster = Cluster(model, workers)
    cluster.refresh()
    yield cluster
    cluster.stop()


def greedy(rt, prompt: list[int]) -> list[int]:
    r = client(rt).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    return r.choices[0].token_ids


def reserved(address: str) -> int:
    """Requests holding reserved blocks on a decode worker, waiting for their KV."""
    with grpc.insecure_channel(address) as channel:
        stats = rpc.DecodeServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)
    return stats.queues["reserved"]


def test_prefill_timeout_falls_back_to_local(slow, tiny_model):
    rt = slow.router("tcp", prefill_timeout_s=0.5)
    prompt = make_prompts([30], seed=61)[0]
    assert greedy(rt, prompt) == hf_greedy(tiny_model("llama"), [prompt], 8)[0]
    assert routed(rt, "local", "prefill_timeout") == 1
    slow.wait_all_free(timeout=DELAY_S + 5)  # the prefill worker aborts after its delay


def test_prefill_worker_killed_mid_request_completes_locally_then_rejoins(slow, tiny_model):
    rt = slow.router("ray")
    old = slow.infos["fault-prefill-0"]
    prompts = make_prompts([26, 33], seed=62)
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    result: dict[str, list[int]] = {}
    threads = Threads()
    threads.start(lambda: result.setdefault("ids", greedy(rt, prompts[0])))
    # The decode worker holds the reservation: the router is on its way to (or inside) the
    # prefill worker's Prefill call, which waits 2 s there before it prefills.
    decode = slow.infos["fault-decode-0"]["address"]
    wait_until(lambda: reserved(decode) == 1, timeout=30, what="the reservation")
    os.kill(old["pid"], signal.SIGKILL)
    threads.join(60)
    assert result["ids"] == want[0]
    assert routed(rt, "local", "prefill_failed") == 1
    # Ray restarts the actor; the router registers the new incarnation (new port, epoch).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = httpx.get(rt.url + "/health").json()["workers"]
        w = workers.get("fault-prefill-0")
        if w and w["healthy"] and w["address"] != old["address"]:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"restarted prefill worker never registered: {workers}")
    slow.refresh()
    assert slow.infos["fault-prefill-0"]["epoch"] != old["epoch"]
    assert greedy(rt, prompts[1]) == want[1]
    assert routed(rt, "remote", "cost") == 1
    slow.wait_all_free()
