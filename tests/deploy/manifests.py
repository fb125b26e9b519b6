"""Offline manifest validation helpers: strict YAML loading and strict JSON schemas.

The API server prunes or rejects fields its schema does not know; a JSON-schema check
only does the same when objects are closed, so CRD schemas are closed here
(``additionalProperties: false`` wherever properties are listed) and core kinds use
``kubernetes-validate``'s strict schemas.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
KUBE_VERSION = "1.30"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_all(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``text``; duplicate keys are errors."""
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)


def close_objects(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema where objects with listed properties reject others."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(filename: str, version: str) -> jsonschema.Draft7Validator:
    crd = load(SCHEMAS / filename)
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(close_objects(spec["schema"]["openAPIV3Schema"]))


def validate_raycluster(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    crd_validator("kuberay-ray.io_rayclusters.yaml", "v1").validate(doc)


def validate_core(doc: dict[str, Any]) -> None:
    """Strict Kubernetes schema for a built-in kind (raises on any problem)."""
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# prometheus-operator's CRD is not vendored here; this is the subset of
# monitoring.coreos.com/v1 ServiceMonitor the chart uses, with the same field types.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any]) -> None:
    """Validate one rendered manifest against the schema of its kind."""
    if doc["kind"] == "RayCluster":
        validate_raycluster(doc)
    elif doc["kind"] == "ServiceMonitor":
        jsonschema.Draft7Validator(SERVICE_MONITOR).validate(doc)
    else:
        validate_core(doc)
