"""One streamed OpenAI request -> a :class:`RequestRecord` (timing in bench/serve/metrics.py).

The request is sent with ``stream: true`` and ``stream_options.include_usage`` so the
server's own token and cached-token counts come back; every SSE ``data:`` line is stamped
with ``time.perf_counter()`` as it arrives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.serve.datasets import BenchRequest
from bench.serve.metrics import RequestRecord, record_from_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    """Server root, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted)."""
    model: str
    endpoint: str = COMPLETIONS
    """``/v1/completions`` (token-id or text prompts) or ``/v1/chat/completions`` (text)."""
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in (COMPLETIONS, CHAT):
            raise ValueError(f"unknown endpoint {self.endpoint!r}; use {COMPLETIONS} or {CHAT}")

    @property
    def url(self) -> str:
        return api_url(self.base_url, self.endpoint)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def api_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path


def payload(cfg: ClientConfig, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == CHAT:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts; use --prompt-format text")
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **cfg.extra_body}


async def send(
    http: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, index: int, t0: float
) -> RequestRecord:
    """Send ``req`` and time its stream; never raises for server or network errors."""
    record = RequestRecord(index, req.prompt_len, req.output_len)
    body = payload(cfg, req)
    events: list[tuple[float, dict[str, Any]]] = []
    start = time.perf_counter()
    record.start = start - t0
    try:
        async with http.stream("POST", cfg.url, json=body, headers=cfg.headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {text[:300]}"
                return record
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                events.append((now, json.loads(data)))
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    return record_from_events(record, start, events)


async def first_model(http: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> str:
    """The first model id the server lists at ``/v1/models``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await http.get(api_url(base_url, "/v1/models"), headers=headers)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url} lists no models; pass --model")
    return models[0]["id"]
