"""Commands and events both worker roles take on their engine thread (engine/worker/loop.py).

A command comes from a gRPC handler and answers through its future; an event (posted by a
transport thread, or by the engine thread itself) answers nothing. Each role adds its own
commands (decode_worker/commands.py, prefill_worker/commands.py); the loop dispatches on
the type, never on a string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Abort:
    """Stop a request wherever it is and free its blocks; answers whether it was known."""

    request_id: str


@dataclass(frozen=True)
class TransferDone:
    """A request's KV transfer reached a terminal state (posted by the transport's thread;
    on FAILED, once no transport thread touches its blocks any more)."""

    request_id: str
    transfer_id: str
    succeeded: bool
    """SUCCESS (every layer arrived, or the receiver confirmed it); else FAILED."""
    at: float = field(default_factory=time.monotonic)
    """When the transport posted it (the decode worker times its admission from it)."""
