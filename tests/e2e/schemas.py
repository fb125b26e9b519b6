"""JSON schemas for the structured-output tests: nesting, enums, arrays, required fields,
patterns, anyOf, nullable. Strings, numbers and arrays are bounded, because the tiny
random model's free choices are noise that would otherwise rarely close a string."""

from __future__ import annotations


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


NAME = {"type": "string", "maxLength": 8}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS = {
    "person": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "enum_and_bool": obj({"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}),
    "int_array": obj({"values": {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 4}}),
    "nested_address": obj(
        {
            "name": NAME,
            "address": obj(
                {
                    "city": {"enum": ["Paris", "Rome", "Oslo"]},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                }  # fmt: skip
            ),
        }
    ),
    "array_of_objects": obj(
        {
            "items": {
                "type": "array",
                "items": obj({"id": SMALL, "tag": {"enum": ["new", "old"]}}),
                "maxItems": 2,
            }
        }
    ),
    "any_of": obj(
        {
            "shape": {
                "anyOf": [
                    obj({"kind": {"const": "circle"}, "r": SMALL}),
                    obj({"kind": {"const": "flag"}, "up": {"type": "boolean"}}),
                ]
            }
        }
    ),
    "nullable": obj({"note": {"type": ["string", "null"], "maxLength": 6}, "n": SMALL}),
    "const_and_int_enum": obj({"version": {"const": 2}, "level": {"enum": [1, 2, 3]}}),
    "matrix": obj(
        {
            "m": {
                "type": "array",
                "items": {"type": "array", "items": SMALL, "maxItems": 2},
                "minItems": 1,
                "maxItems": 2,
            }
        }
    ),
    "deep": obj({"a": obj({"b": obj({"c": obj({"d": {"enum": ["x", "y"]}})})})}),
    "optional_fields": obj(
        {"id": SMALL, "label": NAME, "urgent": {"type": "boolean"}}, required=["id"]
    ),  # fmt: skip
    "pattern_code": obj(
        {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}, "count": SMALL}
    ),  # fmt: skip
}
