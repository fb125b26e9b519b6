"""How a model writes tool calls, chosen per model with ``--tool-call-parser`` (as in vLLM).

hermes       ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one block
             per call, after optional text (Hermes, Qwen 2.5/3, many fine-tunes)
llama3_json  ``{"name": "f", "parameters": {...}}`` as the whole output, calls separated
             by ``; ``, optionally after ``<|python_tag|>`` (Llama 3.1/3.2/3.3)

``tool_choice: required`` or a named function is enforced with a grammar in the model's
own format (:meth:`ToolFormat.grammar`): a Lark grammar whose call bodies are JSON
schemas (llguidance ``%json``), so the name is one of the tools and the arguments follow
that tool's ``parameters``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.grammar import JSON_OPTIONS


@dataclass(frozen=True)
class ToolFormat:
    name: str
    args_key: str
    """Key of the arguments object in a call: ``arguments`` or ``parameters``."""
    start: str | None
    """Marker opening each call; ``None``: a call is a JSON object at the output's start."""
    end: str | None
    """Marker closing each call."""
    separator: str
    """Between two calls in the grammar (and accepted by the parser)."""
    prefix: str = ""
    """Optional marker before the first call (``<|python_tag|>``)."""

    def call_schema(self, fn_name: str, parameters: dict) -> dict:
        return {
            "type": "object",
            "properties": {"name": {"const": fn_name}, self.args_key: parameters},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        }

    def grammar(self, functions: dict[str, dict], parallel: bool) -> str:
        """Lark grammar: one call (or, with ``parallel``, one or more) of the functions
        ``name -> parameters schema``, in this format."""
        schemas = [self.call_schema(n, p) for n, p in functions.items()]
        body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        body = {**body, "x-guidance": JSON_OPTIONS}
        call = "body" if self.start is None else f"{_lit(self.start + chr(10))} body {_lit(chr(10) + self.end)}"  # fmt: skip
        rep = f" ({_lit(self.separator)} call)*" if parallel else ""
        return f"start: call{rep}\ncall: {call}\nbody: %json {json.dumps(body)}\n"


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal has JSON's escapes


FORMATS = {
    "hermes": ToolFormat("hermes", "arguments", "<tool_call>", "</tool_call>", "\n"),
    "llama3_json": ToolFormat("llama3_json", "parameters", None, None, "; ", "<|python_tag|>"),
}


def get_format(name: str) -> ToolFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]
