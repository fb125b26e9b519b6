"""OpenAI-compatible request and response models: only the fields pdserve supports.

Unknown request fields are ignored (as vLLM does). vLLM extensions: ``ignore_eos``,
``min_tokens``, ``stop_token_ids``, ``top_k`` and ``return_token_ids``.

Every numeric field is bounded to what the engine and worker.proto hold (the constants of
engine/sampling_params.py); bounds that need the model (vocabulary, context) are in
router/limits.py. Stop strings: at most ``MAX_STOP_STRINGS`` of at most
``MAX_STOP_CHARS`` characters each.

The OpenAPI schema (``/openapi.json``) states every one of these bounds, so clients and
schema-driven fuzzers (tests/router/test_fuzz_openapi.py) see them: where a validator
below gives a clearer message than pydantic's, the field carries its bounds in a
``WithJsonSchema`` instead.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MIN_TEMPERATURE,
)

MAX_STOP_STRINGS = 64
"""Stop strings per request (OpenAI allows 4, vLLM does not bound them)."""
MAX_STOP_CHARS = 512
"""Characters per stop string: a stream holds back this many - 1 characters, so a longer
one would turn streaming into one final chunk."""
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]

_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}
_TOKENS = {"type": "array", "items": _TOKEN_ID, "minItems": 1}
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_NULL = {"type": "null"}
STOP_SCHEMA = WithJsonSchema(
    {"anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOP_STRINGS}, _NULL]}
)
TEMPERATURE_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": 0},
            {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
            _NULL,
        ],
        "description": f"0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
    }
)
PROMPT_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "minLength": 1},
            _TOKENS,
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": 1,
            },
            {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 1},
        ],
        "description": "text or token ids; a list holds one prompt (no batches)",
    }
)


STRICT = ConfigDict(strict=True)
"""JSON types as the schema states them (OpenAI's API does the same): ``"max_tokens":
"16"``, ``"stream": 1`` or ``"echo": 0`` are 400s, not silently converted."""


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: Annotated[float | None, TEMPERATURE_SCHEMA] = Field(
        default=None, ge=0.0, le=MAX_TEMPERATURE
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOKEN_ID)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Annotated[str | list[str] | None, STOP_SCHEMA] = Field(
        default=None, validate_default=True
    )
    stop_token_ids: list[TokenId] | None = Field(
        default=None, validate_default=True, max_length=MAX_STOP_TOKEN_IDS
    )
    n: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 1})] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKEN_ID)
    return_token_ids: bool = False
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        # Below the minimum, logits / temperature overflows to inf and sampling to NaN.
        if v is not None and v != 0.0 and v < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {v}"
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for i, s in enumerate(stops):
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(
                    f"stop[{i}] is {len(s)} characters; each stop string must have 1 to "
                    f"{MAX_STOP_CHARS} characters"
                )
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got n={v}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int]:
        return list(v or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def effective_top_k(self) -> int | None:
        return None if self.top_k in (None, 0, -1) else self.top_k


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[int] | list[str] | list[list[int]], PROMPT_SCHEMA]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKEN_ID)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[bool, WithJsonSchema({"type": "boolean", "enum": [False]})] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and (not v or any(t < 0 for t in v)):
            raise ValueError("prompt token ids must be a non-empty list of non-negative ints")
        return v

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class ContentPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_chars(self) -> int:
        """Characters of every message's text: what the prompt limit counts."""
        return sum(len(m.text()) for m in self.messages)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pdserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}
