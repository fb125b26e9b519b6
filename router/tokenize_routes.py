"""``/tokenize`` and ``/detokenize``, as vLLM serves them (outside ``/v1``).

    POST /tokenize    {model, prompt, add_special_tokens=true}
                      or {model, messages, add_generation_prompt=true, tools}
                      -> {count, max_model_len, tokens, token_strs?}
    POST /detokenize  {model, tokens} -> {prompt}

Same bounds as a generation request: prompt characters, token ids below the vocabulary.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import MAX_TOKEN_ID
from router import openapi
from router.protocol import ApiError, ChatCompletionRequest, TokenId

tokenize_routes = APIRouter()

MAX_DETOKENIZE = 1 << 20


class TokenizeCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(ChatCompletionRequest):
    return_token_strs: bool = False


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE)


def _limit(svc, model: str) -> int:
    svc.check_model(model)
    limit = svc.max_model_len
    if limit is None:
        raise ApiError(503, "no worker registered yet", "service_unavailable", headers={"Retry-After": "5"})  # fmt: skip
    return limit


@tokenize_routes.post("/tokenize", responses=openapi.TOKENIZE)
async def tokenize(body: TokenizeChat | TokenizeCompletion, request: Request):
    svc = request.app.state.service
    limit = _limit(svc, body.model)
    if isinstance(body, TokenizeChat):
        text = await svc.jobs.render_chat(body, limit)
        ids = await svc.jobs.tokenize(text, limit, False)
    else:
        ids = await svc.jobs.tokenize(body.prompt, limit, body.add_special_tokens)
    out = {"count": len(ids), "max_model_len": limit, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [svc.tokenizer.id_to_token(t) for t in ids]
    return out


@tokenize_routes.post("/detokenize", responses=openapi.TOKENIZE)
async def detokenize(body: Detokenize, request: Request):
    svc = request.app.state.service
    _limit(svc, body.model)
    bad = next((t for t in body.tokens if not 0 <= t < min(svc.jobs.limits.vocab_size, MAX_TOKEN_ID)), None)  # fmt: skip
    if bad is not None:
        raise ApiError(
            400,
            f"tokens: token id {bad} is outside the vocabulary [0, {svc.jobs.limits.vocab_size})",
            param="tokens",
        )
    return {"prompt": svc.tokenizer.decode(body.tokens)}
