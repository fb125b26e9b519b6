"""Chat request parts: messages, tools, tool_choice, response_format, structured_outputs.

Every model forbids unknown keys (a field pdserve would not act on is refused, never
dropped); a few that OpenAI clients echo back in a conversation's history (``refusal``,
``annotations``, ``audio`` / ``function_call`` left null) are accepted as they change
nothing.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.sampling_params import MAX_GRAMMAR_CHARS

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class FieldError(ValueError):
    """A check across fields that names the one to fix (the 400's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Strict(BaseModel):
    """Unknown keys refused; strict JSON types (``"strict": "true"`` is a 400, not True)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str
    """JSON text of the arguments, as the API returns it."""


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict:
        """What chat templates expect: ``arguments`` as a mapping where it is JSON."""
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        fn = {"name": self.function.name, "arguments": args}
        return {"id": self.id, "type": "function", "function": fn}


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    """Output-only citations that clients send back in the history: they change nothing."""
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content if self.content is not None else (self.refusal or "")

    def num_chars(self) -> int:
        calls = sum(len(c.function.arguments) + len(c.function.name) for c in self.tool_calls or ())
        return len(self.text()) + calls

    def for_template(self) -> dict:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    """Arguments always follow ``parameters`` when the call is enforced (tool_choice
    required or named); ``strict`` asks nothing more."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME.match(v):
            raise ValueError(f"function name {v[:80]!r} must match {TOOL_NAME.pattern}")
        return v

    @property
    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object"}


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class StructuredOutputs(Strict):
    """vLLM's ``structured_outputs`` extension: exactly one of its constraints."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1, max_length=1024)  # fmt: skip
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            names = [g.rstrip("_") for g in given]
            raise ValueError(
                "give exactly one of json, regex, choice, grammar, json_object; "
                f"got {names or 'none'}"
            )
        return self
