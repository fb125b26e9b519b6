"""A quantized KV cache through the router: aggregated and disaggregated over tcp and shm
(Ray workers, real gRPC, real KV transport), greedy output agrees with the model-dtype
cache, the transport carries about half of bf16's bytes per token, and a prefill worker
with another KV dtype than the cluster's is refused, naming both."""

from __future__ import annotations

from dataclasses import replace

import grpc
import httpx
import pytest

from engine import LLM, SamplingParams
from engine.config import CacheConfig
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.launch.ray_launcher import RayWorkers
from tests.engine.hf_reference import make_prompts
from tests.engine.quant_kv_model import make_decisive_model
from tests.engine.test_quant_kv import MIN_AGREE, NEW_TOKENS, NUM_PROMPTS

from .conftest import MODEL_NAME, NUM_BLOCKS, Cluster, client, worker_config

MODES = ["aggregated", "tcp", "shm"]
PROMPTS = make_prompts([3 + (i * 37) % 120 for i in range(NUM_PROMPTS)], seed=11)


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    return make_decisive_model(tmp_path_factory.mktemp("quant-kv-e2e") / "llama")


@pytest.fixture(scope="module")
def dense(decisive) -> list[list[int]]:
    """The model-dtype (float32) cache's greedy tokens, from the engine alone."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLM(decisive).generate(PROMPTS, params)]


def start(model, prefix: str, roles: dict[str, str]) -> Cluster:
    """One worker per role in ``roles`` (role -> its --kv-cache-dtype)."""
    workers = RayWorkers()
    for role, kv in roles.items():
        config = worker_config(model, transports=("tcp", "shm"))
        cache = CacheConfig(num_blocks=NUM_BLOCKS, kv_cache_dtype=kv)
        workers.launch(role, 1, replace(config, engine=replace(config.engine, cache=cache)), prefix)  # fmt: skip
    cluster = Cluster(model, workers)
    cluster.refresh()
    return cluster


def decode_transfer_stats(cluster: Cluster) -> dict[str, int]:
    with grpc.insecure_channel(cluster.addresses("decode")[0]) as channel:
        return dict(rpc.DecodeServiceStub(channel).Stats(pb.StatsRequest(), timeout=10).transfer)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_quant_kv_through_the_router(ray_session, decisive, dense, kv_cache_dtype):
    cluster = start(decisive, f"q{kv_cache_dtype}-", {"prefill": kv_cache_dtype, "decode": kv_cache_dtype})  # fmt: skip
    try:
        for mode in MODES:
            rt = cluster.router(mode)
            c = client(rt)
            before = decode_transfer_stats(cluster)
            got = []
            for prompt in PROMPTS:
                out = c.completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )  # fmt: skip
                got.append(out.choices[0].token_ids)
            agree = sum(a == b for a, b in zip(got, dense, strict=True))
            assert agree >= MIN_AGREE, f"{kv_cache_dtype} {mode}: {agree}/{NUM_PROMPTS} agree"
            after = decode_transfer_stats(cluster)
            if mode != "aggregated":
                check_bytes_per_token(cluster, mode, before, after)
            check_pool_reported(rt, kv_cache_dtype)
            cluster.wait_all_free()
    finally:
        cluster.stop()


def check_bytes_per_token(cluster: Cluster, mode: str, before: dict, after: dict) -> None:
    """Bytes the decode worker's endpoint received, per transferred token, against the
    bf16 cache's: (head_dim + 2) / (2 x head_dim) -- half, plus the scales."""
    nbytes = after[f"{mode}.received_bytes"] - before.get(f"{mode}.received_bytes", 0)
    pages = after[f"{mode}.received_pages"] - before.get(f"{mode}.received_pages", 0)
    assert pages > 0, f"nothing went over {mode}"
    layers, heads, head_dim, block = 2, 2, 16, 16  # the tiny llama's layout
    tokens = pages // (2 * layers) * block
    bf16 = 2 * layers * heads * head_dim * 2
    assert nbytes / tokens / bf16 == (head_dim + 2) / (2 * head_dim)


def check_pool_reported(rt, kv_cache_dtype: str) -> None:
    """/health and /metrics give each worker's pool in tokens and bytes per token."""
    workers = httpx.get(rt.url + "/health", timeout=10).json()["workers"]
    per_token = 2 * 2 * 2 * (16 + 2)  # layers x K,V x kv heads x (head_dim + scale bytes)
    for w in workers.values():
        assert w["kv_cache_dtype"] == kv_cache_dtype
        assert (w["kv_pool_tokens"], w["kv_bytes_per_token"]) == (NUM_BLOCKS * 16, per_token)
    text = httpx.get(rt.url + "/metrics", timeout=10).text
    for wid in workers:
        assert f'pdserve_kv_pool_tokens{{worker="{wid}"}} {NUM_BLOCKS * 16}.0' in text
        assert f'pdserve_kv_bytes_per_token{{worker="{wid}"}} {per_token}.0' in text


def test_quant_kv_dtype_mismatch_refused_naming_both(ray_session, decisive, caplog):
    """An fp8 prefill worker beside a model-dtype decode worker: the router refuses the
    one that differs from the cluster's layout, naming both KV dtypes, and serves on."""
    cluster = start(decisive, "qmix-", {"decode": "auto", "prefill": "fp8_e4m3"})
    try:
        rt = cluster.router("tcp")
        c = client(rt)
        out = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0.0)  # fmt: skip
        assert out.choices[0].finish_reason == "length"
        refused = [r.reason for r in rt.router.registry.refused]
        assert any("kv_cache_dtype mismatch: cluster=auto" in r and "=fp8_e4m3" in r for r in refused), refused  # fmt: skip
        cluster.wait_all_free()
    finally:
        cluster.stop()
