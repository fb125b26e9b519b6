"""The disaggregated path through a real router to in-process workers (real gRPC and KV
planes, no Ray): greedy output equals HF in both reserve modes over tcp and shm, every hop
lands in ``pdserve_disagg_hop_seconds``, the first token reaches the client while the
reservation is still pending (overlap), and a request whose KV never arrives after its
first token continues on the decode worker, still equal to HF."""

from __future__ import annotations

import json
import re
import threading

import grpc
import httpx
import pytest

from tests.decode_worker.inproc import start, stub, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.faults import DelayRpc, FailRpc, LateRpc

from .inproc_cluster import MODEL_NAME, complete, router

HOPS = ("reserve", "prefill_queue", "prefill_compute", "transfer_tail", "decode_admission")


@pytest.fixture
def cluster(tiny_model):
    """``cluster(p_interceptors=..., d_interceptors=..., **router_config)``."""
    made = []

    def make(p_faults=(), d_faults=(), **cfg):
        model = tiny_model("llama")
        p = start("prefill", model, transports=("tcp", "shm"), interceptors=p_faults, worker_id=f"p{len(made)}")  # fmt: skip
        d = start("decode", model, transports=("tcp", "shm"), interceptors=d_faults, worker_id=f"d{len(made)}")  # fmt: skip
        rt = router(model, [p, d], prefill_overload_factor=0.0, **cfg)
        made.append((rt, p, d))
        return rt

    make.made = made  # (router, P, D) of each cluster made
    yield make
    for rt, p, d in made:
        stubs = [stub(p), stub(d)]
        try:
            wait_all_free([s for s, _ in stubs], timeout=10)
        finally:
            for _, channel in stubs:
                channel.close()
            rt.stop()
            p.stop()
            d.stop()


def metric(rt, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}\{{{want}\}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.findall(pattern, httpx.get(rt.url + "/metrics").text, re.M)
    return float(found[0]) if found else 0.0


def hop_counts(rt) -> dict[str, float]:
    return {h: metric(rt, "pdserve_disagg_hop_seconds_count", hop=h) for h in HOPS}


def stream_ids(rt, prompt, on_first=None) -> list[int]:
    """A streamed greedy completion's token ids; ``on_first()`` runs once the first token
    reached this client."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip
    ids: list[int] = []
    with httpx.stream("POST", rt.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            new = choices[0].get("token_ids") or [] if choices else []
            if new and not ids and on_first is not None:
                on_first()
            ids += new
    return ids


@pytest.mark.parametrize("mode", ["overlap", "serial"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_equal_to_hf_and_every_hop_is_measured(cluster, tiny_model, mode, transport):
    rt = cluster(kv_transport=transport, reserve_mode=mode)
    prompts = make_prompts([37, 21], seed=501 + 2 * (mode == "serial") + (transport == "shm"))
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    got = [complete(rt, p).json()["choices"][0]["token_ids"] for p in prompts]
    assert got == want
    assert hop_counts(rt) == dict.fromkeys(HOPS, 2.0)
    assert metric(rt, "pdserve_routing_decisions_total", path="remote", reason="cost") == 2
    assert metric(rt, "pdserve_kv_transfer_bytes_total") > 0


def test_first_token_reaches_the_client_before_the_reservation(cluster, tiny_model):
    """D's Reserve is held until this client has the first token, then refused: the
    request continues on D from that token (no KV came), equal to HF, counted as a
    local reserve_failed route like a refusal before the first token."""
    first_seen = threading.Event()
    refuse = FailRpc("Reserve", grpc.StatusCode.RESOURCE_EXHAUSTED, after=first_seen)
    rt = cluster(d_faults=[refuse], kv_transport="tcp")
    prompt = make_prompts([33], seed=511)[0]
    ids = stream_ids(rt, prompt, on_first=first_seen.set)
    assert first_seen.is_set()
    assert ids == hf_greedy(tiny_model("llama"), [prompt], 8)[0]
    assert metric(rt, "pdserve_routing_decisions_total", path="local", reason="reserve_failed") == 1  # fmt: skip


def test_kv_lost_after_the_first_token_continues_on_decode(cluster, tiny_model):
    """The ticket reaches P only after D's lease ended: D never gets the KV, and the
    request goes on from its first token on D."""
    late = DelayRpc("AttachTicket", 1.5)
    rt = cluster(p_faults=[late], kv_transport="shm", lease_s=0.5)
    prompt = make_prompts([29], seed=512)[0]
    assert complete(rt, prompt).json()["choices"][0]["token_ids"] == hf_greedy(tiny_model("llama"), [prompt], 8)[0]  # fmt: skip
    assert metric(rt, "pdserve_routing_decisions_total", path="local", reason="transfer_failed") == 1  # fmt: skip


def decode_free(cluster, timeout: float) -> None:
    """The last cluster's D holds no block and no request within ``timeout``."""
    s, channel = stub(cluster.made[-1][2])
    try:
        wait_all_free([s], timeout=timeout)
    finally:
        channel.close()


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_an_abort_the_fallback_overtakes_still_frees_the_reservation(cluster, tiny_model):
    """P refuses the ticket (UNAVAILABLE, as a dead P would), and its Prefill fails while the
    router's Abort to D is still on its way: the fallback must not cancel that Abort, or
    D holds the reservation until its lease (120 s here)."""
    abort_seen = threading.Event()
    p_faults = [FailRpc("AttachTicket", UNAVAILABLE), FailRpc("Prefill", UNAVAILABLE, after=abort_seen)]  # fmt: skip
    rt = cluster(p_faults, [DelayRpc("Abort", 2.0, seen=abort_seen)], kv_transport="tcp", lease_s=120)  # fmt: skip
    prompt = make_prompts([26], seed=513)[0]
    assert complete(rt, prompt).json()["choices"][0]["token_ids"] == hf_greedy(tiny_model("llama"), [prompt], 8)[0]  # fmt: skip
    assert metric(rt, "pdserve_routing_decisions_total", path="local", reason="prefill_failed") == 1  # fmt: skip
    decode_free(cluster, timeout=10)


def test_a_reservation_made_after_its_abort_is_aborted_once_reserve_answers(cluster, tiny_model):
    """P's Prefill fails at once and the router aborts D before D handles the Reserve (it
    runs only once D saw that Abort, and to its end): the reservation D then makes is
    aborted when its reply comes, not left to its lease (120 s here)."""
    abort_seen = threading.Event()
    d_faults = [DelayRpc("Abort", 0.0, seen=abort_seen), LateRpc("Reserve", until=abort_seen)]
    rt = cluster([FailRpc("Prefill", UNAVAILABLE)], d_faults, kv_transport="tcp", lease_s=120)
    prompt = make_prompts([26], seed=514)[0]
    assert complete(rt, prompt).json()["choices"][0]["token_ids"] == hf_greedy(tiny_model("llama"), [prompt], 8)[0]  # fmt: skip
    assert metric(rt, "pdserve_routing_decisions_total", path="local", reason="prefill_failed") == 1  # fmt: skip
    decode_free(cluster, timeout=10)
