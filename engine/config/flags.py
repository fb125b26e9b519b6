"""Command-line flags generated from the config tree: the one place that turns fields into
``argparse`` arguments, so each default and each help text lives on its field.

    field                                  flag
    block_size: int = 16  ("Tokens...")    --block-size N      (help: the docstring)
    dtype: Literal["auto", ...]            --dtype {auto,...}
    ignore: bool = False                   --ignore            (store_true)
    enable_x: bool = True, flag("--no-x")  --no-x              (store_false)
    num_blocks: int | None = None          --num-blocks N      (optional)
    kv_transports: tuple[Literal...,...]   --kv-transport X    (repeatable)
    role: Literal[...] (no default)        --role {...}        (required)

A flag left out of the command line is left out of the parsed values (``SUPPRESS``): the
field's own default applies when the config is built (engine/config/tree.py). Metadata
(engine/config/fields.py) renames a flag, drops one (``flag(None)``), or names what an
omitted flag means when a command resolves it itself (``cli_default``: the demo model,
the best device).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from typing import Any, Literal

from engine.config.fields import CLI_DEFAULT, FLAG, PER_ROLE
from engine.config.tree import Leaf, leaves, nest

SEP = "__"
"""Joins a leaf's path into its argparse ``dest``."""


@functools.cache
def docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its annotation (PEP 257 attribute
    docstrings), read from the class source with ``ast``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


def flag_name(leaf: Leaf) -> str | None:
    meta = leaf.field.metadata
    if FLAG in meta:
        return meta[FLAG]
    if leaf.type is bool and leaf.default is True:
        return "--no-" + leaf.name.removeprefix("enable_").replace("_", "-")
    return "--" + leaf.name.replace("_", "-")


def _kind(tp: Any) -> tuple[Any, list[Any] | None, bool, bool]:
    """(element type, choices, optional, repeatable) of an annotation."""
    optional = repeat = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is tuple:
        repeat, tp = True, typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        choices = list(typing.get_args(tp))
        return type(choices[0]), choices, optional, repeat
    return tp, None, optional, repeat


def _help(leaf: Leaf) -> str:
    text = docstrings(leaf.owner).get(leaf.name, "")
    meta = leaf.field.metadata
    if CLI_DEFAULT in meta:
        return f"{text} (default: {meta[CLI_DEFAULT][1]})"
    default = leaf.default
    if default is MISSING or default is None or isinstance(default, bool) or default == ():
        return text
    shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def argparse_kwargs(leaf: Leaf) -> dict[str, Any]:
    meta = leaf.field.metadata
    default = meta[CLI_DEFAULT][0] if CLI_DEFAULT in meta else argparse.SUPPRESS
    kwargs: dict[str, Any] = {"help": _help(leaf), "default": default}
    if leaf.type is bool:
        kwargs["action"] = "store_false" if leaf.default is True else "store_true"
        return kwargs
    elem, choices, _, repeat = _kind(leaf.type)
    kwargs["type"] = elem
    if choices is not None:
        kwargs["choices"] = choices
    if repeat:
        kwargs["action"] = "append"
    if choices is None and "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if leaf.default is MISSING and CLI_DEFAULT not in meta:
        kwargs["required"] = True
    return kwargs


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    dest: str,
    exclude: Iterable[str] = (),
    per_role: Iterable[str] = (),
) -> None:
    """A flag for every leaf of ``cls`` (paths joined with dots in ``exclude`` are left
    out, with everything under them). Leaves marked ``per_role()`` get one flag per role
    in ``per_role`` (``--prefill-ep-size``) instead, or a plain one without roles."""
    skip = tuple(exclude)
    roles = tuple(per_role)
    for leaf in leaves(cls):
        dotted = ".".join(leaf.path)
        name = flag_name(leaf)
        if name is None or any(dotted == s or dotted.startswith(s + ".") for s in skip):
            continue
        kwargs = argparse_kwargs(leaf)
        names = [(name, dest)]
        per = leaf.field.metadata.get(PER_ROLE)
        if per and roles:
            suffix = per if isinstance(per, str) else name[2:]
            names = [(f"--{role}-{suffix}", role) for role in roles]
        for flag, where in names:
            shown = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
            if "choices" in kwargs or kwargs.get("action") in ("store_true", "store_false"):
                shown.pop("metavar")
            parser.add_argument(flag, dest=SEP.join((where, *leaf.path)), **shown)


def read_flags(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The nested values given under ``dest`` (only the flags that were on the line)."""
    prefix = dest + SEP
    flat = {
        tuple(key[len(prefix) :].split(SEP)): _value(value)
        for key, value in vars(args).items()
        if key.startswith(prefix)
    }
    return nest(flat)


def _value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def given(values: Mapping[str, Any], *path: str) -> Any:
    """``values[path...]`` or ``None`` when that flag was not on the line."""
    node: Any = values
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
