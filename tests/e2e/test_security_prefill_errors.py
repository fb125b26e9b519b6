"""Remote prefill failures through a real router (in-process workers over real gRPC, real
HTTP): an INTERNAL from the prefill worker is that request's own failure (non-finite
logits, on a checkpoint broken on purpose) and is final: a 502 naming the reason, never
a local prefill on the decode worker computing it a second time. A ticket the prefill
worker refuses (PERMISSION_DENIED; here the decode worker has no cluster secret, so its
tickets are unsigned) falls back to local prefill under its own metric reason,
``ticket_refused``, and still answers HF-exact."""

from __future__ import annotations

import httpx
import pytest

from engine.security import ClusterSecret
from router.server import Router
from router.service import RouterConfig
from tests.decode_worker.inproc import start
from tests.engine.broken_model import POISON, clean_prompts, nan_token_model
from tests.engine.hf_reference import hf_greedy
from tests.router.fuzz_cluster import assert_nothing_held

from .conftest import MODEL_NAME
from .inproc_cluster import complete, router

SECRET = ClusterSecret(b"prefill-errors-test-secret-0123456")


def routed(rt, path: str, reason: str) -> float:
    needle = f'pdserve_routing_decisions_total{{path="{path}",reason="{reason}"}} '
    for line in httpx.get(rt.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def workers():
    started = []

    def make(role: str, model, **kw):
        started.append(start(role, model, **kw))
        return started[-1]

    yield make
    for w in started:
        w.stop()


def test_security_prefill_internal_is_final_not_prefilled_again(workers, tiny_model, tmp_path):
    broken = nan_token_model(tiny_model("llama"), tmp_path / "broken")
    p, d = workers("prefill", broken, worker_id="p"), workers("decode", broken, worker_id="d")
    generated = []
    real = d.worker.engine.add_request  # local prefill on D (Generate) adds a request
    d.worker.engine.add_request = lambda rid, *a, **k: (generated.append(rid), real(rid, *a, **k))[1]  # fmt: skip
    rt = router(broken, [p, d], kv_transport="tcp")
    try:
        good = clean_prompts(broken, [19], seed=361)[0]
        r = complete(rt, [5, POISON, 6] + good)
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert "prefill worker p failed this request" in message
        assert "non-finite logits (NaN or inf)" in message and "Traceback" not in r.text
        assert generated == [], "the failed request was prefilled again on the decode worker"
        assert routed(rt, "local", "prefill_failed") == 0
        assert complete(rt, good).json()["choices"][0]["token_ids"] == hf_greedy(broken, [good], 8)[0]  # fmt: skip
        assert generated == []  # the good one went remote too
        assert_nothing_held(rt, [p, d])
    finally:
        rt.stop()


def test_security_refused_ticket_falls_back_as_ticket_refused(workers, tiny_model):
    model = tiny_model("llama")
    p = workers("prefill", model, worker_id="p", secret=SECRET)
    d = workers("decode", model, worker_id="d")  # no secret: it issues unsigned tickets
    cfg = RouterConfig(str(model), MODEL_NAME, kv_transport="tcp")
    rt = Router(cfg, [p.address, d.address], poll_interval_s=0.2, secret=SECRET).start_in_thread()
    try:
        prompt = clean_prompts(model, [23], seed=362)[0]
        r = complete(rt, prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == hf_greedy(model, [prompt], 8)[0]
        assert routed(rt, "local", "ticket_refused") == 1
        assert routed(rt, "local", "prefill_failed") == 0
        assert_nothing_held(rt, [p, d])
    finally:
        rt.stop()
