"""Schemathesis against the router's own OpenAPI schema, fetched from ``/openapi.json`` of
a real router (real HTTP) in front of real in-process workers (1 prefill + 1 decode over
gRPC, KV over tcp, the tiny Llama): every operation, with schema-valid, boundary
(schemathesis' coverage phase) and schema-violating (negative) data.

Checked on every response: never a 5xx but a documented 503/504 for load, an answer
within the call's deadline (no hang), a status and content type the schema documents,
error bodies in the documented OpenAI shape, and schema-violating bodies refused with a
4xx. After the session (``session_end``): the router's in-flight count and every
worker's in-flight slot are back to zero, every KV block is free, and greedy output is
still HF-exact.

Positive cases carry the served model's name (the schema's ``model`` is pinned to it in
the copy fuzzed here, so valid bodies reach the workers); negative ones send anything.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
from hypothesis import event, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from router.app import create_app
from router.server import Router
from router.service import RouterConfig
from tests.fuzzing import examples

from .fuzz_cluster import assert_nothing_held, assert_serving_hf_exact, start

MODEL = "tiny"
CALL_TIMEOUT_S = 60.0
"""Every call's deadline: the longest a fuzzed request may run (its context is small)."""
LOAD_STATUSES = {503, 504}


@pytest.fixture(scope="module")
def cluster(tiny_model):
    model = tiny_model("llama")
    workers = [start(role, model, worker_id=f"fz-{role}") for role in ("prefill", "decode")]
    cfg = RouterConfig(str(model), MODEL, kv_transport="tcp", request_timeout_s=30.0)
    rt = Router(cfg, [w.address for w in workers], poll_interval_s=0.2).start_in_thread()
    yield rt, workers, model
    rt.stop()
    for w in workers:
        w.stop()


@pytest.fixture(autouse=True)
def session_end(cluster):
    """After each operation's fuzz session: nothing held, still serving HF-exact."""
    yield
    rt, workers, model = cluster
    assert_nothing_held(rt, workers)
    assert_serving_hf_exact(rt, model, MODEL, seed=4501)


def router_schema() -> dict:
    """What ``/openapi.json`` serves, built from the router's own app (the same code path,
    without a running router: schemathesis' fixture-based loader does not run on pytest 9);
    ``test_fuzz_openapi_schema_is_the_served_one`` checks the two are equal."""
    cfg = RouterConfig("unused", MODEL)
    return create_app(SimpleNamespace(config=cfg)).openapi()


def fuzzed_schema() -> schemathesis.BaseSchema:
    doc = copy.deepcopy(router_schema())
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [MODEL]}  # fmt: skip
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=examples(30)
    )
    return schema


schema = fuzzed_schema()


def no_server_error(ctx, response, case) -> None:
    """Stricter than schemathesis' own: a 5xx is allowed only for load (503/504)."""
    if response.status_code >= 500 and response.status_code not in LOAD_STATUSES:
        raise AssertionError(f"{response.status_code}: {response.text[:500]}")


@schema.parametrize()
@settings(deadline=None)
def test_fuzz_openapi(case, cluster):
    rt = cluster[0]
    response = case.call(base_url=rt.url, timeout=CALL_TIMEOUT_S)
    event(
        f"{case.meta.phase.name.value}/{case.meta.generation.mode.value} -> {response.status_code}"
    )
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],  # fmt: skip
        additional_checks=[no_server_error],
    )


def test_fuzz_openapi_schema_is_the_served_one(cluster):
    rt = cluster[0]
    served = httpx.get(rt.url + "/openapi.json", timeout=10).raise_for_status().json()
    assert served == router_schema()
