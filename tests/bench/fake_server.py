"""A small fake OpenAI server for load-generator tests: timed SSE streams, a simulated
prefix cache (16-token blocks), a concurrency gauge, and failures on request.

    first chunk  after ``ttft_s`` (its text is empty, like a token still being detokenized)
    next chunks  every ``tpot_s``, one token each; then the usage message and [DONE]
    HTTP 500     when ``max_tokens == fail_max_tokens``
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

BLOCK = 16


@dataclass
class FakeState:
    ttft_s: float = 0.02
    tpot_s: float = 0.004
    fail_max_tokens: int | None = None
    seen_blocks: set = field(default_factory=set)
    inflight: int = 0
    max_inflight: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    bodies: list[dict] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)

    def cache(self, ids: list[int]) -> int:
        """Leading full blocks already seen (chained, so a block counts only after its parent)."""
        hit, parent = 0, ()
        for i in range(len(ids) // BLOCK):
            parent = (parent, tuple(ids[i * BLOCK : (i + 1) * BLOCK]))
            key = hash(parent)
            if key in self.seen_blocks and hit == i * BLOCK:
                hit += BLOCK
            self.seen_blocks.add(key)
        return hit


def _sse(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        ids = prompt if isinstance(prompt, list) else [ord(c) for c in prompt]
        n = body.get("max_completion_tokens" if chat else "max_tokens") or 16
        cached = state.cache(ids)
        state.prompt_tokens += len(ids)
        state.cached_tokens += cached
        state.inflight += 1
        state.max_inflight = max(state.max_inflight, state.inflight)
        try:
            yield ": keep-alive comment\n\n"
            await asyncio.sleep(state.ttft_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(state.tpot_s)
                text = "" if i == 0 else f"t{i} "
                choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
                choice.update({"delta": {"content": text}} if chat else {"text": text})
                yield _sse({"id": "x", "choices": [choice], "usage": None})
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                     "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
            yield _sse({"id": "x", "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:
            state.inflight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.received_at.append(time.perf_counter())
        state.bodies.append(body)
        n = body.get("max_completion_tokens" if chat else "max_tokens")
        if n == state.fail_max_tokens:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    def __init__(self, state: FakeState | None = None) -> None:
        self.state = state or FakeState()
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=0, log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
