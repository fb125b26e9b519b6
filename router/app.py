"""The HTTP routes: thin adapters from the OpenAI protocol to :class:`RouterService`.

Errors are OpenAI-shaped (``{"error": {message, type, param, code}}``) with the documented
status: validation 400 (FastAPI's 422 is remapped), unknown route 404, and whatever
``ApiError`` the service raises. A stream reports errors before its first token as an HTTP
status and later ones in-band.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.api import Shaper
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from router.run import Output
from router.service import RouterService

logger = logging.getLogger(__name__)


def error_body(status: int, message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code or status}}


def _api_error_response(exc: ApiError) -> JSONResponse:
    body = error_body(exc.status, exc.message, exc.type, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def create_app(service: RouterService, lifespan=None) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)
    app.include_router(probes)
    app.include_router(v1)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        body = error_body(exc.status_code, str(exc.detail), "invalid_request_error")
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {exc!r}", "server_error"), 500)


def _service(request: Request) -> RouterService:
    return request.app.state.service


async def _auth(request: Request) -> None:
    key = _service(request).config.api_key
    if key:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "invalid or missing API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )


probes = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth)])


@probes.get("/health")
async def health(request: Request):
    state = _service(request).state
    decodes = state.workers("decode")
    body = {
        "status": "ok" if decodes else "unavailable",
        "cluster_state": state.health(),
        "workers": {
            w.worker_id: {
                "role": w.role,
                "healthy": w.healthy,
                "address": w.address,
                "epoch": w.epoch,
                "ep_size": w.ep_size,
            }
            for w in state.workers(healthy_only=False)
        },
    }
    if decodes:
        return JSONResponse(body, 200)
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


@probes.get("/metrics")
async def metrics(request: Request):
    svc = _service(request)
    svc.metrics.state_connected.set(1 if svc.state.health()["connected"] else 0)  # as of now
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")


@v1.get("/models")
async def models(request: Request):
    svc = _service(request)
    card = ModelCard(id=svc.config.served_model_name, max_model_len=svc.max_model_len)
    return ModelList(data=[card]).model_dump()


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    job, shaper = _service(request).completion_job(body)
    return await respond(_service(request), job, shaper, body, request)


@v1.post("/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    job, shaper = _service(request).chat_job(body)
    return await respond(_service(request), job, shaper, body, request)


async def _until(outs: AsyncIterator[Output], timeout_s: float) -> AsyncIterator[Output]:
    """``outs`` under an overall deadline; the generator is closed (aborting) on expiry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                out = await asyncio.wait_for(outs.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(504, f"request timed out after {timeout_s:g}s", "timeout") from None
            yield out
    finally:
        await outs.aclose()


async def respond(service: RouterService, job, shaper: Shaper, body, request: Request):
    outs = _until(service.generate(job), service.config.request_timeout_s)
    if body.stream:
        try:
            first = await outs.__anext__()  # errors before the first token keep their status
        except StopAsyncIteration:
            first = None
        return StreamingResponse(
            shaper.stream(_chain(first, outs), body.include_usage, _stream_error),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    collected = await _collect_or_disconnect(outs, request)
    return JSONResponse(shaper.full(collected))


async def _chain(first: Output | None, rest: AsyncIterator[Output]) -> AsyncIterator[Output]:
    try:
        if first is not None:
            yield first
            if first.finish_reason is not None:
                return
        async for out in rest:
            yield out
    finally:
        await rest.aclose()


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, ApiError):
        return error_body(exc.status, exc.message, exc.type, exc.param, exc.code)
    logger.exception("stream failed", exc_info=exc)
    return error_body(500, f"internal error: {exc!r}", "server_error")


async def _collect_or_disconnect(outs: AsyncIterator[Output], request: Request) -> list[Output]:
    """Gather every output; a client that goes away cancels (and so aborts) the request."""

    async def collect() -> list[Output]:
        return [out async for out in outs]

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ApiError(499, "client disconnected", "client_closed_request")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
