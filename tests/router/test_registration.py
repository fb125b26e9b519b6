"""Registration over real gRPC: a worker whose KV layout differs is refused with a clear log."""

from __future__ import annotations

import logging

import httpx

from engine.config.router import RouterConfig
from router.server import Router
from tests.decode_worker.inproc import start, stub, wait_all_free


def test_layout_mismatch_is_refused_at_registration(tiny_model, caplog):
    model = tiny_model("llama")
    decode = start("decode", model, worker_id="d16")
    odd = start("prefill", model, block_size=32, worker_id="p32")
    router = None
    try:
        with caplog.at_level(logging.ERROR, logger="router.workers"):
            router = Router(RouterConfig(str(model), "m"), [decode.address, odd.address])
            rt = router.start_in_thread()
        assert [r.worker_id for r in router.registry.refused] == ["p32"]
        msg = caplog.text
        assert (
            "refusing prefill worker p32" in msg
            and "block_size mismatch: cluster=16, p32=32" in msg
        )
        assert [w.worker_id for w in router.state.workers()] == ["d16"]
        health = httpx.get(rt.url + "/health").json()
        assert list(health["workers"]) == ["d16"]
        assert health["workers"]["d16"]["ep_size"] == 1  # from Info, as registered
        body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
        r = httpx.post(rt.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        rt.stop()
        stubs = [stub(w) for w in (decode, odd)]
        wait_all_free([s for s, _ in stubs])
        for _, channel in stubs:
            channel.close()
    finally:
        decode.stop()
        odd.stop()
