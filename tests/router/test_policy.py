"""Routing: load- and prefix-aware cost, conditional disaggregation, the shared hashes."""

from __future__ import annotations

import asyncio

import pytest

from engine.config.router import RouterConfig
from engine.kv_cache.hashing import hash_blocks
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.spec import KVLayoutSpec
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.job import Job
from router.metrics import Metrics
from router.policy import CostPolicy, NoWorkerError, RouteDecision, RouteRequest
from router.service import RouterService
from router.state.base import WorkerLoad, WorkerRecord
from router.state.memory import MemoryClusterState
from router.workers import Registry
from tests.engine.hash_spec import PINNED_100_TO_149_BS16, spec_chain

SPEC = KVLayoutSpec("fp", 2, 2, 16, "float32", 16)


def worker(wid: str, role: str, epoch: int = 1, **load) -> WorkerRecord:
    return WorkerRecord(wid, role, f"{wid}:1", SPEC, 64, 2048, epoch, load=WorkerLoad(**load))


def req(tokens: list[int]) -> RouteRequest:
    return RouteRequest(len(tokens), hash_blocks(tokens, 16))


@pytest.fixture
def state() -> MemoryClusterState:
    s = MemoryClusterState()
    for w in (worker("d0", "decode"), worker("d1", "decode"), worker("p0", "prefill")):
        s.register(w)
    return s


class Recording(CostPolicy):
    """The cost policy, keeping the requests the router hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[RouteRequest] = []

    def route(self, request: RouteRequest, state) -> RouteDecision:
        self.seen.append(request)
        return super().route(request, state)


def test_router_hashes_equal_the_engine_prefix_cache(state, tiny_model):
    """The router's request hashes and the engine's prefix-cache hashes both equal the spec
    (an independent re-implementation) and a pinned vector; so the router finds the blocks
    the engine reported."""
    tokens = list(range(100, 150))
    kv = KVCacheManager(16, 16)
    engine_hashes = kv.block_hashes(Request("r", tokens, SamplingParams()))
    assert engine_hashes == spec_chain(tokens, 16) == PINNED_100_TO_149_BS16
    state.apply_block_events("d1", stored=engine_hashes, evicted=[])  # d1's own events
    policy, registry = Recording(), Registry(state, Metrics())
    registry.layout = SPEC
    model = str(tiny_model("llama"))
    config, tokenizer = RouterConfig(model, "m"), Tokenizer.from_dir(model)
    service = RouterService(config, state, registry, policy, Metrics(), tokenizer)
    decision = asyncio.run(service.route(Job("cmpl-1", tokens, SamplingParams(), [])))
    assert [r.block_hashes for r in policy.seen] == [PINNED_100_TO_149_BS16]
    assert (decision.decode.worker_id, decision.cached_blocks) == ("d1", 3)


def test_prefix_aware_picks_the_worker_holding_the_prefix(state):
    tokens = list(range(200, 264))
    state.record_prefix("d1", hash_blocks(tokens, 16)[:3])
    d = CostPolicy().route(req(tokens), state)
    assert (d.decode.worker_id, d.cached_blocks, d.path, d.prefill.worker_id) == (
        "d1",
        3,
        "remote",
        "p0",
    )


def test_load_aware_avoids_the_busy_worker(state):
    state.heartbeat("d0", WorkerLoad(num_running=10, queued_prefill_tokens=500))
    assert CostPolicy().route(req([1, 2, 3]), state).decode.worker_id == "d1"
    state.add_inflight("d1", 50)  # 16 * 50 > 500 + 16 * 10
    assert CostPolicy().route(req([1, 2, 3]), state).decode.worker_id == "d0"


def test_short_uncached_prompt_prefills_locally(state):
    policy = CostPolicy(local_prefill_tokens=8)
    assert (policy.route(req([1] * 8), state).path, policy.route(req([1] * 8), state).reason) == (
        "local",
        "short_prompt",
    )
    long = list(range(300, 340))
    assert policy.route(req(long), state).path == "remote"
    state.record_prefix("d0", hash_blocks(long, 16))
    state.record_prefix("d1", hash_blocks(long, 16))
    d = policy.route(req(long), state)  # 8 uncached tokens after 2 cached blocks
    assert (d.path, d.reason) == ("local", "prefix_cached")


def test_no_healthy_prefill_worker_means_local(state):
    state.mark_unhealthy("p0")
    d = CostPolicy().route(req([1, 2]), state)
    assert (d.path, d.reason, d.prefill) == ("local", "no_prefill_worker", None)
    state.deregister("p0")
    assert CostPolicy().route(req([1, 2]), state).reason == "aggregated"


def test_no_decode_worker_raises(state):
    state.mark_unhealthy("d0")
    state.mark_unhealthy("d1")
    with pytest.raises(NoWorkerError):
        CostPolicy().route(req([1]), state)


def test_prefix_index_is_capped_and_reset_on_new_epoch(state):
    hashes = list(range(100))
    state.record_prefix("d0", hashes)  # capped at the worker's 64 blocks, oldest dropped
    assert state.match_prefix("d0", hashes[36:]) == 64 and state.match_prefix("d0", hashes) == 0
    state.register(worker("d0", "decode", epoch=2))  # restarted: its cache is empty
    assert state.match_prefix("d0", hashes[36:]) == 0


def test_overloaded_prefill_worker_means_local(state):
    """Remote TTFT (P's queue + the prompt) above 8x local TTFT (D's queue + the prompt)."""
    prompt = req(list(range(400, 464)))  # 64 uncached tokens
    state.heartbeat("p0", WorkerLoad(queued_prefill_tokens=64 * 7))
    assert CostPolicy().route(prompt, state).path == "remote"  # 512 <= 8 * 64
    state.heartbeat("p0", WorkerLoad(queued_prefill_tokens=64 * 8))
    d = CostPolicy().route(prompt, state)
    assert (d.path, d.reason, d.prefill) == ("local", "prefill_overloaded", None)
    assert CostPolicy(overload_factor=0).route(prompt, state).path == "remote"  # check off


def test_measured_prefill_rates_predict_ttft(state):
    prompt = req(list(range(400, 464)))
    # A fast prefill worker with a queue still beats a slow decode worker prefilling itself.
    state.heartbeat("p0", WorkerLoad(queued_prefill_tokens=5000, prefill_tokens_per_s=1e5))
    state.heartbeat("d0", WorkerLoad(prefill_tokens_per_s=100.0))
    state.heartbeat("d1", WorkerLoad(prefill_tokens_per_s=100.0))
    assert CostPolicy().route(prompt, state).path == "remote"  # 0.05 s vs 8 * 0.64 s
    state.heartbeat("d0", WorkerLoad(prefill_tokens_per_s=1e5))  # as fast: local wins now
    state.heartbeat("d1", WorkerLoad(prefill_tokens_per_s=1e5))
    assert CostPolicy().route(prompt, state).reason == "prefill_overloaded"


def test_prefill_worker_with_the_lowest_predicted_ttft_wins(state):
    state.register(worker("p1", "prefill"))
    state.heartbeat("p0", WorkerLoad(queued_prefill_tokens=100, prefill_tokens_per_s=10.0))
    state.heartbeat("p1", WorkerLoad(queued_prefill_tokens=300, prefill_tokens_per_s=1000.0))
    d = CostPolicy().route(req(list(range(400, 464))), state)
    assert (d.path, d.prefill.worker_id) == ("remote", "p1")  # 0.36 s vs 16.4 s


def test_measured_transfer_bandwidth_counts_one_layer_of_exposed_transfer(state):
    prompt = req(list(range(400, 464)))  # 4 blocks of 16 tokens, 512 B of KV per token
    for wid in ("p0", "d0", "d1"):
        state.heartbeat(wid, WorkerLoad(prefill_tokens_per_s=1000.0))
    policy = CostPolicy()
    p, d = state.get("p0"), state.get("d0")
    assert policy.remote_ttft(p, d, 64) == pytest.approx(0.064)  # no bandwidth measured yet
    policy.observe_transfer("p0", "d0", 64 * 512, 1.0)  # 32 KiB/s, over 2 layers
    assert policy.remote_ttft(p, d, 64) == pytest.approx(0.064 + 0.5)
    assert policy.route(prompt, state).reason == "prefill_overloaded"  # 0.564 > 8 * 0.064
    policy.observe_transfer("p0", "d0", 64 * 512, 0.0)  # ignored
    assert policy.remote_ttft(p, d, 64) == pytest.approx(0.564)
