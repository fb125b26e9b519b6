"""JSON-schema forms of the request bounds that a validator checks in router/protocol.py
(where the validator's message is clearer than pydantic's, the field carries its bounds
in a ``WithJsonSchema`` instead): ``/openapi.json`` states every bound, so clients and
schema-driven fuzzers (tests/router/test_fuzz_openapi.py) see exactly what the edge
accepts."""

from __future__ import annotations

from pydantic import WithJsonSchema

from engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MIN_TEMPERATURE,
)

MAX_STOP_STRINGS = 64
"""Stop strings per request (OpenAI allows 4, vLLM does not bound them)."""
MAX_STOP_CHARS = 512
"""Characters per stop string: a stream holds back this many - 1 characters, so a longer
one would turn streaming into one final chunk."""
TOKEN_KEY = r"^[0-9]{1,10}$"
"""A ``logit_bias`` key: a token id as a decimal string (at most ``MAX_TOKEN_ID``)."""

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
LOGIT_BIAS_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {
                "type": "object",
                "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
                "propertyNames": {"pattern": TOKEN_KEY},
                "additionalProperties": {
                    "type": "number",
                    "minimum": -MAX_LOGIT_BIAS,
                    "maximum": MAX_LOGIT_BIAS,
                },
            },
            _NULL,
        ],
        "description": f"token id (a decimal string, below the vocabulary size) -> bias in "
        f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
    }
)
