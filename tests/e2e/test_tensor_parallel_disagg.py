"""Disaggregated serving between TP groups through the router (standalone `pdserve worker
--tp-size N` processes, gloo): prefill TP=2 -> decode TP=2, TP=1 -> TP=2 and TP=2 -> TP=1
over tcp and shm, every request prefilled remotely with its KV moved rank to rank, greedy
output equal to HF, and every KV block back on every worker afterwards; a prefill rank
killed mid-prefill fails that prefill naming it and both groups end up holding nothing."""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import pytest

from engine.config.router import RouterConfig
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.server import Router
from tests.decode_worker.inproc import spec, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.waiting import Threads

from .conftest import MODEL_NAME
from .tp_workers import launch, ready, workers

MAX_NEW = 8
PAIRS = [("p2", "d2"), ("p1", "d2"), ("p2", "d1")]


@pytest.fixture(scope="module")
def tp_cluster(tiny_model):
    model = tiny_model("llama")
    specs = [("p2", "prefill", 2), ("p1", "prefill", 1), ("d2", "decode", 2), ("d1", "decode", 1)]
    with workers(model, specs) as started:
        yield model, started


def _stubs(addresses):
    out = []
    for addr, role in addresses:
        channel = grpc.insecure_channel(addr)
        cls = rpc.DecodeServiceStub if role == "decode" else rpc.PrefillServiceStub
        out.append((cls(channel), channel))
    return out


def _remote_count(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith('pdserve_routing_decisions_total{path="remote"')]  # fmt: skip
    return sum(float(ln.split()[-1]) for ln in lines)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize(("prefill", "decode"), PAIRS)
def test_tensor_parallel_disagg_through_the_router_equals_hf(tp_cluster, prefill, decode, transport):  # fmt: skip
    model, started = tp_cluster
    cfg = RouterConfig(str(model), MODEL_NAME, kv_transport=transport, prefill_overload_factor=0.0)
    rt = Router(cfg, [started[prefill].address, started[decode].address], poll_interval_s=0.2)
    rt = rt.start_in_thread()
    prompts = make_prompts([23, 40, 7, 31], seed=hash((prefill, decode, transport)) % 1000)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": MAX_NEW, "temperature": 0}
        body |= {"ignore_eos": True, "return_token_ids": True}
        r = httpx.post(rt.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got[i] = r.json()["choices"][0]["token_ids"]

    try:
        threads = Threads()
        for i in range(len(prompts)):
            threads.start(run, i)
        threads.join(timeout=120)
        assert [got[i] for i in range(len(prompts))] == hf_greedy(model, prompts, MAX_NEW)
        assert _remote_count(rt.url) == len(prompts)  # every one disaggregated, none local
        stubs = _stubs([(started[prefill].address, "prefill"), (started[decode].address, "decode")])  # fmt: skip
        try:
            wait_all_free([s for s, _ in stubs], timeout=10)
            info = stubs[1][0].Info(pb.InfoRequest(), timeout=5)
            assert info.tp_size == (2 if decode == "d2" else 1)
        finally:
            for _, channel in stubs:
                channel.close()
    finally:
        rt.stop()


def test_tensor_parallel_killed_prefill_rank_fails_the_prefill_and_frees_both_groups(tp_cluster):  # fmt: skip
    """Prefill TP=2 -> decode TP=2: a 900-token prompt in 4-token chunks is still
    prefilling when the prefill follower dies; the Prefill call fails naming the rank, the
    prefill leader exits, and every part on the decode group ends, so it frees the
    reservation on every rank."""
    model, started = tp_cluster
    proc = launch(model, "prefill", "pk2", 2, "--max-num-batched-tokens", "4")
    try:
        p = ready(proc, "prefill", "pk2", 2)
        (dstub, dchan), (pstub, pchan) = _stubs([(started["d2"].address, "decode"), (p.address, "prefill")])  # fmt: skip
        prompt = make_prompts([900], seed=94)[0]
        reserve = pb.ReserveRequest(request=spec("pk", prompt), kv_transport="tcp", lease_s=60, prefill_tp_size=2)  # fmt: skip
        res = dstub.Reserve(reserve, timeout=10)
        assert len(res.parts) == 2 and {t.src_rank for t in res.parts} == {0, 1}
        call = pstub.Prefill.future(
            pb.PrefillRequest(request=spec("pk", prompt), ticket=res.ticket, parts=res.parts), timeout=60
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while pstub.Stats(pb.StatsRequest(), timeout=5).num_requests == 0:
            assert time.monotonic() < deadline and not call.done(), "prefill never started"
            time.sleep(0.005)
        os.kill(p.followers[0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=15)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"TP rank 1 (pid {p.followers[0]}) died" in err.value.details(), err.value.details()
        assert "tensor-parallel group of pk2 failed" in err.value.details()
        assert proc.wait(timeout=15) != 0  # the leader exits for its supervisor to restart
        wait_all_free([dstub], timeout=15)  # both parts ended on the decode group
        pchan.close()
        dchan.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
