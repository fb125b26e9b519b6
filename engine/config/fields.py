"""Field metadata of the config tree, read by the flag generator (engine/config/flags.py)
and the serialiser (engine/config/tree.py)."""

from __future__ import annotations

from typing import Any

FLAG = "pdserve.flag"
"""The command-line flag of a field: a name, or ``None`` for a field with no flag."""
RUNTIME = "pdserve.runtime"
"""A value filled on the node at run time (a secret, a resolved address): never serialised."""
CLI_DEFAULT = "pdserve.cli_default"
"""What an omitted flag means when its command resolves it (not the field's default)."""
PER_ROLE = "pdserve.per_role"
"""``pdserve serve``: one flag per worker role (``--prefill-ep-size``, ``--decode-ep-size``);
its value names the flag after the role (``tp``: ``--prefill-tp``), or ``True``."""


def flag(name: str | None, **more: Any) -> dict[str, Any]:
    """Metadata naming a field's flag (``None``: none)."""
    return {FLAG: name, **more}


def runtime(flag_name: str | None = None) -> dict[str, Any]:
    """Metadata of a field filled at run time (a secret, a resolved address): never
    serialised; a flag only where the command line may give it (``--api-key``)."""
    return {FLAG: flag_name, RUNTIME: True}


def cli_default(value: Any, meaning: str) -> dict[str, Any]:
    """On the command line an omitted flag is ``value``, which the command resolves to
    ``meaning`` (``--model``: None, the tiny demo model; ``--device``: auto)."""
    return {CLI_DEFAULT: (value, meaning)}


def per_role(name: str | None = None) -> dict[str, Any]:
    """One flag per role: ``--<role>-<name>`` (default: the plain flag's name)."""
    return {PER_ROLE: name or True}
