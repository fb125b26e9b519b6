"""Serving with CUDA KV caches through the real router (HTTP), gRPC workers and kv_transfer:
aggregated (decode worker only) and disaggregated over every transport. Both workers use
the Triton backend (``auto`` on CUDA) in bfloat16; greedy output must equal the offline
engine on the same device and dtype token for token (the same kernels on the same
prompt: the transfer is bit-exact), and every KV block is back afterwards."""

from __future__ import annotations

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.config.router import RouterConfig
from router.server import Router
from tests.decode_worker.inproc import start, stub, wait_all_free
from tests.e2e.test_parity import routed
from tests.engine.hf_reference import make_prompts

from .conftest import ON_CUDA, device, needs_two_devices

pytestmark = pytest.mark.gpu

MAX_NEW, DTYPE = 12, "bfloat16"
SAME_DEVICE = ("tcp", "shm", "ucx")
PROMPTS = make_prompts([23, 40, 7], seed=211)


def _pair(model, transports, prefill_device: str):
    decode = start("decode", model, transports=transports, device=device(0), dtype=DTYPE)
    prefill = start("prefill", model, transports=transports, device=prefill_device, dtype=DTYPE)  # fmt: skip
    return decode, prefill


@pytest.fixture(scope="module")
def want(tiny_model) -> list[list[int]]:
    llm = LLM(tiny_model("llama"), device=device(0), dtype=DTYPE, num_kv_blocks=64)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, greedy)]


def _serve(model, addresses: list[str], transport: str) -> list[list[int]]:
    # The overload check off: every prompt takes the path under test, whatever the measured
    # prefill rates and bandwidth say.
    cfg = RouterConfig(str(model), "m", kv_transport=transport, prefill_overload_factor=0)
    rt = Router(cfg, addresses, poll_interval_s=0.25).start_in_thread()
    try:
        out = []
        for prompt in PROMPTS:
            body = {"model": "m", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0.0}
            body |= {"ignore_eos": True, "return_token_ids": True}
            r = httpx.post(rt.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["token_ids"])
        path = ("local", "aggregated") if len(addresses) == 1 else ("remote", "cost")
        assert routed(rt, *path) == len(PROMPTS), httpx.get(rt.url + "/metrics").text
        return out
    finally:
        rt.stop()


def _check(workers, model, transport: str, want, aggregated: bool = False) -> None:
    decode, prefill = workers
    stubs = [stub(w) for w in workers]
    try:
        for w in workers:  # cached on the device, computed by the Triton kernels
            assert w.worker.engine.backend.name == ("triton" if ON_CUDA else "torch")
        addresses = [decode.address] if aggregated else [decode.address, prefill.address]
        assert _serve(model, addresses, transport) == want
        wait_all_free([s for s, _ in stubs], timeout=10)
    finally:
        for _, channel in stubs:
            channel.close()


@pytest.fixture(scope="module")
def same_device(tiny_model):
    workers = _pair(tiny_model("llama"), SAME_DEVICE, device(0))
    yield workers
    for w in workers:
        w.stop()


def test_aggregated_on_cuda(same_device, tiny_model, want):
    _check(same_device, tiny_model("llama"), "tcp", want, aggregated=True)


@pytest.mark.parametrize("transport", SAME_DEVICE)
def test_disaggregated_on_cuda(same_device, tiny_model, want, transport):
    _check(same_device, tiny_model("llama"), transport, want)


@needs_two_devices
def test_disaggregated_over_nccl(tiny_model, want):
    """torch_dist on CUDA is NCCL: one rank per device, so the prefill worker is on cuda:1."""
    workers = _pair(tiny_model("llama"), ("torch_dist",), device(1))
    try:
        _check(workers, tiny_model("llama"), "torch_dist", want)
    finally:
        for w in workers:
            w.stop()
