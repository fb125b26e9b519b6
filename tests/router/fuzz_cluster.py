"""A small real cluster for the HTTP fuzz tests, and the invariants a fuzz session must
leave behind on it: nothing in flight (router and per-worker slots), every KV block
free, every worker serving, and greedy output still HF-exact."""

from __future__ import annotations

import time

import grpc
import httpx

from engine.config import CacheConfig, EngineConfig, WorkerConfig
from engine.grpc_auth import call_metadata
from engine.security import load_cluster_secret
from engine.worker.host import RunningWorker
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.launch.worker_main import start_worker
from router.server import RouterThread
from tests.engine.hf_reference import hf_greedy, make_prompts

NUM_BLOCKS = 16
"""KV blocks per worker: a 256-token context, so no fuzzed request generates for long."""


def start(role: str, model, **kw) -> RunningWorker:
    engine = EngineConfig(str(model), cache=CacheConfig(block_size=16, num_blocks=NUM_BLOCKS))
    return start_worker(WorkerConfig(role, engine, kv_transports=("tcp",), **kw))


def _poll(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.02)


def _secret(w: RunningWorker):
    path = w.config.cluster_secret_file
    return load_cluster_secret(path) if path else None


def _stats(workers: list[RunningWorker]) -> list[pb.StatsResponse]:
    """Every worker's Stats (authenticated with the worker's own secret, if it has one)."""
    out = []
    for w in workers:
        decode = w.config.role == "decode"
        cls = rpc.DecodeServiceStub if decode else rpc.PrefillServiceStub
        method = f"/pdserve.worker.{'Decode' if decode else 'Prefill'}Service/Stats"
        with grpc.insecure_channel(w.address) as channel:
            md = call_metadata(_secret(w), method)
            out.append(cls(channel).Stats(pb.StatsRequest(), timeout=5, metadata=md))
    return out


def assert_nothing_held(rt: RouterThread, workers: list[RunningWorker], timeout: float = 15) -> None:  # fmt: skip
    """The router's and every worker's in-flight counts are zero; every block is free."""
    svc, state = rt.router.service, rt.router.state
    _poll(lambda: svc.inflight == 0, timeout, f"router in-flight {svc.inflight} not back to 0")
    _poll(
        lambda: all(w.inflight == 0 for w in state.workers(healthy_only=False)),
        timeout,
        "per-worker in-flight slots not released",
    )

    def all_free() -> bool:
        return all(s.num_free_blocks == s.num_blocks and not s.num_requests for s in _stats(workers))  # fmt: skip

    _poll(all_free, timeout, f"KV blocks or requests still held: {_stats(workers)}")


def assert_serving_hf_exact(rt: RouterThread, model, model_name: str, seed: int) -> None:
    """Every worker healthy, and a greedy completion through the router equals HF's."""
    health = httpx.get(rt.url + "/health", timeout=5)
    assert health.status_code == 200, health.text
    assert all(w["healthy"] for w in health.json()["workers"].values()), health.text
    prompt = make_prompts([21], seed=seed)[0]
    body = {"model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body |= {"ignore_eos": True, "return_token_ids": True}
    r = httpx.post(rt.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == hf_greedy(model, [prompt], 8)[0]
