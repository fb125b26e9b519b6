"""A request's output constraint: ``response_format``, ``structured_outputs`` or an
enforced tool call, as one ``StructuredOutput``, checked before any worker sees it.

    response_format     json_object | json_schema (chat)
    structured_outputs  json | regex | choice | grammar | json_object (vLLM extension)
    tool_choice         required | a named function: the tool-call format's grammar

At most one of them constrains a request (400 naming the second otherwise). A JSON schema
must be a valid JSON Schema (``jsonschema``), and every spec must compile with the same
grammar backend the workers use (engine/grammar.py, cached per spec): a 400 names the
field and the problem.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import Executor

import jsonschema

from engine.grammar import GrammarBackend, GrammarError
from engine.sampling_params import MAX_GRAMMAR_CHARS, StructuredOutput
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from router.tools.formats import ToolFormat


def _schema_text(schema, param: str) -> str:
    text = json.dumps(schema)
    why = _schema_problem(text)
    if why is not None:
        raise ApiError(400, f"{param} is not a valid JSON Schema: {why}", param=param.split(".")[0])  # fmt: skip
    return text


@functools.lru_cache(maxsize=512)
def _schema_problem(text: str) -> str | None:
    """Why the schema (JSON text) is not a valid JSON Schema; cached: clients resend the
    same few schemas, and checking one costs about a millisecond."""
    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"{exc.message} (at {'/'.join(str(p) for p in exc.path) or '(root)'})"
    return None


def from_response_format(body: ChatCompletionRequest) -> StructuredOutput | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput("json_object")
    schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
    return _constraint("json", _schema_text(schema, "response_format.json_schema.schema"), "response_format")  # fmt: skip


def from_structured_outputs(body) -> StructuredOutput | None:
    so = body.structured_outputs
    if so is None:
        return None
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ApiError(400, f"structured_outputs.json is not JSON: {exc}", param="structured_outputs") from None  # fmt: skip
        return _constraint("json", _schema_text(schema, "structured_outputs.json"))
    if so.regex is not None:
        return _constraint("regex", so.regex)
    if so.choice is not None:
        return _constraint("choice", json.dumps(so.choice))
    if so.grammar is not None:
        return _constraint("grammar", so.grammar)
    return StructuredOutput("json_object")


def _constraint(kind: str, spec: str, param: str = "structured_outputs") -> StructuredOutput:
    if len(spec) > MAX_GRAMMAR_CHARS:
        raise ApiError(400, f"{param}: the constraint is {len(spec)} characters; the limit is {MAX_GRAMMAR_CHARS}", param=param)  # fmt: skip
    try:
        return StructuredOutput(kind, spec)
    except ValueError as exc:  # e.g. an empty regex
        raise ApiError(400, f"{param}: {exc}", param=param) from None


def from_tool_choice(body: ChatCompletionRequest, fmt: ToolFormat | None) -> StructuredOutput | None:  # fmt: skip
    choice = body.effective_tool_choice
    tools = {t.function.name: t.function.schema for t in body.tools or ()}
    for name, schema in tools.items():
        _schema_text(schema, f"tools.{name}.parameters")
    if choice in ("none", "auto"):
        return None
    if isinstance(choice, str):  # required: any tool, one or more calls
        return _constraint("grammar", fmt.grammar(tools, body.parallel_tool_calls), "tools")
    name = choice.function.name
    return _constraint("grammar", fmt.grammar({name: tools[name]}, parallel=False), "tools")


def resolve(
    body: CompletionRequest | ChatCompletionRequest, fmt: ToolFormat | None
) -> tuple[StructuredOutput | None, str | None]:
    """The request's constraint and the field it came from (``None``: free text)."""
    found = [("structured_outputs", from_structured_outputs(body))]
    if isinstance(body, ChatCompletionRequest):
        found.append(("response_format", from_response_format(body)))
        found.append(("tool_choice", from_tool_choice(body, fmt)))
        _check_tools(body, fmt, found[1][1])
    given = [(p, so) for p, so in found if so is not None]
    if len(given) > 1:
        raise ApiError(
            400,
            f"{given[0][0]} and {given[1][0]} both constrain the output; give only one",
            param=given[1][0],
        )
    if not given:
        return None, None
    param, so = given[0]
    return so, param


def _check_tools(body: ChatCompletionRequest, fmt: ToolFormat | None, response_format) -> None:
    choice = body.effective_tool_choice
    if choice == "none" or not body.tools:
        return
    if fmt is None:
        raise ApiError(
            400,
            f"tool_choice={choice if isinstance(choice, str) else 'a named function'} needs "
            "the server started with --tool-call-parser (hermes or llama3_json, the model's "
            "tool-call format); send tool_choice none to chat without tools",
            param="tool_choice",
        )
    if response_format is not None and choice == "auto":
        raise ApiError(
            400,
            "response_format with tools and tool_choice auto is not supported (the output "
            "would have to be either a tool call or the JSON); use tool_choice none, "
            "required or a named function, or drop response_format",
            param="response_format",
        )


async def check_compiles(
    backend: GrammarBackend, so: StructuredOutput, param: str, pool: Executor
) -> None:
    """Compile ``so`` (cached) off the event loop; a 400 naming ``param`` if it cannot be."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(pool, backend.prepare, so)
    except GrammarError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from None
