"""OpenAI-compatible request and response models: only the fields pdserve supports.

Unknown request fields are refused (400 naming the field, with what to use instead where
there is something): a field pdserve would not act on is never silently dropped. Fields
OpenAI clients send that change nothing are accepted: ``user``, ``safety_identifier``,
``metadata``, ``prompt_cache_key`` (prefix caching is automatic), ``store: false``,
``service_tier: auto|default``, ``modalities: ["text"]``, ``prompt_cache_retention:
in_memory``, and ``best_of`` equal to ``n``. vLLM extensions: ``ignore_eos``,
``min_tokens``, ``stop_token_ids``, ``top_k``, ``min_p``, ``repetition_penalty``,
``return_token_ids``, ``structured_outputs`` and (chat) ``add_generation_prompt``.

Every numeric field is bounded to what the engine and worker.proto hold (the constants of
engine/sampling_params.py); bounds that need the model (vocabulary, context) are in
router/limits.py. Types are strict JSON types, and the OpenAPI schema (``/openapi.json``)
states every bound (router/protocol_schema.py for those a validator below checks).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
)
from router.protocol_chat import (
    MAX_TOOLS,
    ChatMessage,
    FieldError,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolChoice,
)
from router.protocol_schema import (
    LOGIT_BIAS_SCHEMA,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    PROMPT_SCHEMA,
    STOP_SCHEMA,
    TEMPERATURE_SCHEMA,
    TOKEN_KEY,
)

MAX_N = 16
"""Choices per request (each one is a generation; the prompt is computed once)."""
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)]
_TOKEN_KEY = re.compile(TOKEN_KEY)

UNSUPPORTED = {
    "suffix": "insertion after a suffix is not supported",
    "functions": "use tools",
    "function_call": "use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this server serves no reasoning model",
    "verbosity": "not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_options": "prefix caching is automatic and has no options",
    "guided_json": "use structured_outputs.json (or response_format)",
    "guided_regex": "use structured_outputs.regex",
    "guided_choice": "use structured_outputs.choice",
    "guided_grammar": "use structured_outputs.grammar",
    "prompt_logprobs": "use echo with logprobs (completions)",
}
"""Fields refused with a hint: the message of an unknown field's 400 adds it."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

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
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKEN_ID)
    return_token_ids: bool = False
    user: str | None = Field(default=None, max_length=512)
    """Accepted and unused (OpenAI abuse monitoring)."""
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)  # fmt: skip
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    logit_bias: Annotated[dict[str, float] | None, LOGIT_BIAS_SCHEMA] = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(v)}")  # fmt: skip
        for key, bias in v.items():
            if not _TOKEN_KEY.match(key) or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key[:40]!r}")  # fmt: skip
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias} for token {key}")  # fmt: skip
        if len({int(k) for k in v}) != len(v):
            raise ValueError("logit_bias names a token id twice (e.g. '7' and '07')")
        return v

    @property
    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

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
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKEN_ID)
    """0 only with ``echo``: score the prompt and generate nothing."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    """Accepted only equal to ``n`` (what it then means: n choices, all returned)."""

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
    def _echo_and_best_of(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens=0 is only allowed with echo (to score the prompt)")  # fmt: skip
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError(
                "best_of",
                f"best_of={self.best_of} is not supported (only best_of equal to n={self.n}): "
                "request n choices and rank them yourself",
            )
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_ID)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Accepted, and they change nothing (see the module docstring).
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)  # fmt: skip
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "in-memory"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=512)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_chars(self) -> int:
        """Characters of every message (and tool definition): what the prompt limit counts."""
        tools = sum(len(t.model_dump_json()) for t in self.tools or ())
        return sum(m.num_chars() for m in self.messages) + tools

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tools: every function needs a distinct name")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise FieldError("tool_choice", f"tool_choice={_choice_name(choice)} needs tools")
        if not isinstance(choice, str) and choice is not None and choice.function.name not in names:  # fmt: skip
            raise FieldError("tool_choice", f"tool_choice names function {choice.function.name!r}, which is not in tools {names}")  # fmt: skip
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


def _choice_name(choice) -> str:
    return choice if isinstance(choice, str) else f"function {choice.function.name!r}"


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
