"""The HTTP routes: thin adapters from the OpenAI protocol to :class:`RouterService`.

Errors are OpenAI-shaped (``{"error": {message, type, param, code}}``) with the documented
status: validation 400 (FastAPI's 422 is remapped), a body over ``max_body_bytes`` 413
(router/middleware.py), unknown route 404, and whatever ``ApiError`` the service raises.
A stream reports errors before its first token as an HTTP status and later ones in-band.
A 500 carries no exception text: it names a request id that the log has the details for.
"""

from __future__ import annotations

import hmac
import logging
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import openapi
from router.api import Shaper
from router.choices import run_choices
from router.middleware import BodyLimit
from router.protocol import UNSUPPORTED, ApiError, ChatCompletionRequest, CompletionRequest
from router.protocol_chat import FieldError
from router.protocol_responses import ModelCard, ModelList
from router.service import RouterService
from router.streaming import EventStream, chain, collect, first_output, until
from router.tokenize_routes import tokenize_routes

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
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = [cause.param]
        param = param or (loc[0] if loc and not loc[0].isdigit() else None)  # not a JSON offset
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = _unsupported(loc)
        value = err.get("input")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "got" not in msg:
            msg += f", got {_shown(value)}"  # a number; never a whole body echoed back
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return "; ".join(parts) or "invalid request", param


def _unsupported(loc: list[str]) -> str:
    name = loc[-1] if loc else "?"
    hint = UNSUPPORTED.get(name) if len(loc) == 1 else None
    return (
        f"unsupported field `{name[:64]}`"
        + (f": {hint}" if hint else "")
        + "; pdserve refuses fields it would not honour (see the README's list of request fields)"
    )


def _shown(value: int | float) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def internal_error(
    what: str, request_id: str | None = None, exc: BaseException | None = None
) -> dict:
    """Log ``exc`` under a request id; the client gets only that id."""
    request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
    logger.error("internal error on %s (request id %s)", what, request_id, exc_info=exc)
    message = f"internal server error (request id {request_id}); the router's log has the details"  # fmt: skip
    return error_body(500, message, "server_error")


def create_app(service: RouterService, lifespan=None) -> FastAPI:
    # /openapi.json is served (router/openapi.py); the interactive docs pages are not.
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    _install_error_handlers(app)
    app.include_router(probes)
    app.include_router(v1)
    app.include_router(tokenize_routes, dependencies=[Depends(_auth)])
    openapi.install(app)
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
        return JSONResponse(internal_error(request.url.path, exc=exc), 500)


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


@probes.get("/health", responses=openapi.HEALTH)
async def health(request: Request):
    svc = _service(request)
    workers = await svc.io(svc.state.workers, None, False)  # off the loop (Redis)
    decodes = [w for w in workers if w.role == "decode" and w.healthy]
    body = {
        "status": "ok" if decodes else "unavailable",
        "cluster_state": svc.state.health(),
        "workers": {
            w.worker_id: {
                "role": w.role,
                "healthy": w.healthy,
                "address": w.address,
                "epoch": w.epoch,
                "ep_size": w.ep_size,
                "tp_size": w.tp_size,
                "kv_cache_dtype": w.layout.kv_cache_dtype,
                "kv_pool_tokens": w.num_blocks * w.layout.block_size,
                "kv_bytes_per_token": w.layout.bytes_per_token,
            }
            for w in workers
        },
    }
    if decodes:
        return JSONResponse(body, 200)
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


@probes.get("/metrics", responses=openapi.METRICS)
async def metrics(request: Request):
    svc = _service(request)
    svc.metrics.state_connected.set(1 if svc.state.health()["connected"] else 0)  # as of now
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")


def _card(svc: RouterService) -> ModelCard:
    name = svc.config.served_model_name
    return ModelCard(id=name, root=name, max_model_len=svc.max_model_len)


@v1.get("/models", responses=openapi.MODELS)
async def models(request: Request):
    return ModelList(data=[_card(_service(request))]).model_dump()


@v1.get("/models/{model:path}", responses=openapi.MODEL)
async def model(model: str, request: Request):
    svc = _service(request)
    svc.check_model(model)
    return _card(svc).model_dump()


@v1.post("/completions", responses=openapi.GENERATE)
async def completions(body: CompletionRequest, request: Request):
    jobs, shaper = await _service(request).completion_jobs(body)
    return await respond(_service(request), jobs, shaper, body, request)


@v1.post("/chat/completions", responses=openapi.GENERATE)
async def chat(body: ChatCompletionRequest, request: Request):
    jobs, shaper = await _service(request).chat_jobs(body)
    return await respond(_service(request), jobs, shaper, body, request)


async def respond(service: RouterService, jobs, shaper: Shaper, body, request: Request):
    cfg = service.config
    rid = jobs[0].request_id
    outs = until(run_choices(service, jobs), cfg.request_timeout_s)
    if not body.stream:
        return JSONResponse(shaper.full(await collect(outs, request)))
    try:
        first = await first_output(outs, request)  # errors before it keep their status
    except BaseException:
        await outs.aclose()
        raise
    events = shaper.stream(chain(first, outs), body.include_usage, _stream_error(rid))
    return EventStream(events, outs, cfg.stream_stall_timeout_s, rid)


def _stream_error(request_id: str):
    def report(exc: Exception) -> dict:
        if isinstance(exc, ApiError):
            return error_body(exc.status, exc.message, exc.type, exc.param, exc.code)
        return internal_error("a stream", request_id, exc)

    return report
