"""Schemathesis against the router's own OpenAPI schema (``app.openapi()``, the document
``/openapi.json`` serves: ``test_fuzz_openapi_schema_is_the_served_one`` checks they are
equal), sent to a real router (real HTTP) in front of real in-process workers (1 prefill
+ 1 decode over gRPC, KV over tcp, the tiny Llama): every operation, with schema-valid,
boundary (schemathesis' coverage phase) and schema-violating (negative) data.

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
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from engine.sampling_params import MIN_TEMPERATURE
from router.app import create_app
from router.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, CompletionRequest
from router.server import Router
from router.service import RouterConfig
from tests.fuzzing import LONG, examples

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


@pytest.fixture
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
    models = ("CompletionRequest", "ChatCompletionRequest", "TokenizeChat", "TokenizeCompletion", "Detokenize")  # fmt: skip
    for name in models:
        doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [MODEL]}  # fmt: skip
    # make test: the same cases every run (tests/fuzzing.py); make fuzz: fresh ones.
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config(seed=None if LONG else 0))  # fmt: skip
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=examples(50),
        deterministic=not LONG,
        database=None if LONG else "none",
    )
    return schema


schema = fuzzed_schema()


def no_server_error(ctx, response, case) -> None:
    """Stricter than schemathesis' own: a 5xx is allowed only for load (503/504)."""
    if response.status_code >= 500 and response.status_code not in LOAD_STATUSES:
        raise AssertionError(f"{response.status_code}: {response.text[:500]}")


@schema.parametrize()
@settings(deadline=None)
def test_fuzz_openapi(case, cluster, session_end):
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


@pytest.mark.parametrize(
    "field, value",
    [
        ("echo", 0),
        ("stream", 1),
        ("max_tokens", "16"),
        ("max_tokens", 16.0),
        ("temperature", True),
        ("logprobs", False),
        ("stop", 5),
    ],  # fmt: skip
)
def test_fuzz_schema_violating_types_are_refused(field, value):
    """Regression (found by schemathesis' negative mode): ``"echo": 0`` and the like were
    converted silently (pydantic's lax mode) although the schema says otherwise."""
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", field: value})
    ok = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "temperature": 0})
    assert ok.temperature == 0.0  # an integer for a number is what the schema allows


def test_fuzz_schema_states_the_real_statuses_and_bounds():
    """Regression: the schema documented FastAPI's 422 (the router answers 400) and none of
    400/404/413/429/503/504; stop strings, temperature and prompt had no bounds in it."""
    doc = router_schema()
    post = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in post and {"400", "404", "413", "429", "503", "504"} <= set(post)
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    stop_str, stop_list, _ = props["stop"]["anyOf"]
    assert (stop_str["maxLength"], stop_list["maxItems"]) == (MAX_STOP_CHARS, MAX_STOP_STRINGS)
    assert {"minimum": MIN_TEMPERATURE, "maximum": 100.0, "type": "number"} in props["temperature"]["anyOf"]  # fmt: skip
