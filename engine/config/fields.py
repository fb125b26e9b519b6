"""Field metadata of the config tree, read by the flag generator (engine/config/flags.py)
and the serialiser (engine/config/tree.py)."""

from __future__ import annotations

from typing import Any

FLAG = "pdserve.flag"
"""The command-line flag of a field: a name, or ``None`` for a field with no flag."""
RUNTIME = "pdserve.runtime"
"""A value filled on the node at run time (a secret, a resolved address): never serialised."""
PER_ROLE = "pdserve.per_role"
"""``pdserve serve``: one flag per worker role (``--prefill-ep-size``, ``--decode-ep-size``)."""


def flag(name: str | None, **more: Any) -> dict[str, Any]:
    """Metadata naming a field's flag (``None``: none)."""
    return {FLAG: name, **more}


def runtime() -> dict[str, Any]:
    """Metadata of a field filled at run time: no flag, never serialised."""
    return {FLAG: None, RUNTIME: True}


def per_role() -> dict[str, Any]:
    return {PER_ROLE: True}
