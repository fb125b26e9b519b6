"""The router's OpenAPI schema, served at ``/openapi.json``: every route's real answers.

FastAPI documents a 422 for a body that fails validation; the router answers 400 instead
(router/app.py), so the schema drops the 422 and lists, per route, each status the route
can answer with the OpenAI error body (``ErrorResponse``). The request models carry their
bounds (router/protocol.py), so a client generator or a schema-driven fuzzer
(tests/router/test_fuzz_openapi.py) sees exactly what the edge accepts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from router.protocol_responses import ErrorResponse, ModelCard, ModelList


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"}},
    "required": ["data"],
}
"""One server-sent event: ``data: {chunk}`` (an error after the first chunk is one too)."""
AUTH = {401: _error("missing or wrong API key (with --api-key-file)")}
GENERATE = {
    200: {
        "description": "the completion, or with `stream: true` server-sent events ending in `data: [DONE]`",  # fmt: skip
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
    400: _error("invalid parameters, a prompt over the context or a bound (names the field)"),
    **AUTH,
    404: _error("unknown model"),
    413: _error("request body over --max-body-bytes"),
    429: _error("too many requests in flight (Retry-After)"),
    500: _error("internal error: names a request id, never the exception"),
    502: _error("a worker failed this request (e.g. non-finite logits)"),
    503: _error("no healthy decode worker (Retry-After)"),
    504: _error("--request-timeout passed"),
}
MODELS = {200: {"model": ModelList, "description": "the served model"}, **AUTH}
MODEL = {
    200: {"model": ModelCard, "description": "the served model"},
    **AUTH,
    404: _error("unknown model"),
}
TOKENIZE = {
    200: {"description": "the prompt's token ids / the text of the token ids"},
    400: _error(
        "invalid parameters, prompt text over the bound, or a token id outside the vocabulary (names the field)"
    ),  # fmt: skip
    **AUTH,
    404: _error("unknown model"),
    413: _error("request body over --max-body-bytes"),
    503: _error("no worker registered yet (Retry-After)"),
}
HEALTH = {
    200: {"description": "a decode worker serves; workers and cluster-state status"},
    503: {"description": "no healthy decode worker (Retry-After); same body"},
}
METRICS = {
    200: {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def install(app: FastAPI) -> None:
    """Serve the schema above at ``app.openapi_url`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            defs = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                defs.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
