"""Walking the config tree: its leaves (with their field types), JSON-able dicts to send a
config whole to a Ray actor or a process, and overrides by leaf name.

A *leaf* is a field whose value is not a config dataclass; its *path* is the field names
from the root (``("engine", "cache", "block_size")``). Fields marked ``runtime()``
(engine/config/fields.py: a secret, a value filled on the node) are never serialised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from engine.config.fields import FLAG, RUNTIME


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any
    """The resolved annotation (``int | None``, ``Literal[...]``, ``tuple[str, ...]``)."""
    owner: type
    """The dataclass that declares the field."""

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not MISSING else MISSING


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_class(tp: Any) -> type | None:
    """``tp`` if it is a config dataclass (not ``X | None``, not a container)."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf under ``cls``; a nested config whose field has no flag (``flag(None)``)
    is one opaque leaf for the command line but still walked by :func:`to_dict`."""
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        sub = config_class(tp)
        if sub is not None and f.metadata.get(FLAG, "") is not None:
            yield from leaves(sub, (*prefix, f.name))
        elif sub is None:
            yield Leaf((*prefix, f.name), f, tp, cls)


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists; runtime fields are left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get(RUNTIME):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """The config ``cls`` from :func:`to_dict`'s output (missing keys keep their defaults;
    unknown keys are refused, naming them)."""
    types_ = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        sub = config_class(tp)
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value)
        elif _is_tuple(tp) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj))


def from_json(cls: type, text: str) -> Any:
    return from_dict(cls, json.loads(text))


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """``{("a", "b"): 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def merge(base: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """``more`` over ``base``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            value = merge(out[key], value)
        out[key] = value
    return out


def with_leaves(cls: type, **values: Any) -> Any:
    """``cls`` built from leaf values named by field name (``block_size``) or by flag
    (``num_kv_blocks`` for ``--num-kv-blocks``), e.g. ``LLM(model, num_kv_blocks=8)``."""
    by_name: dict[str, tuple[str, ...]] = {}
    for leaf in leaves(cls):
        by_name.setdefault(leaf.name, leaf.path)
        flag = leaf.field.metadata.get(FLAG)
        if flag and not flag.startswith("--no-"):  # a negated flag is no name for the value
            by_name.setdefault(flag.lstrip("-").replace("-", "_"), leaf.path)
    unknown = set(values) - set(by_name)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} settings {sorted(unknown)}; known: {sorted(by_name)}")  # fmt: skip
    return from_dict(cls, nest({by_name[k]: v for k, v in values.items()}))


def _is_tuple(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(tp))
    return origin is tuple
