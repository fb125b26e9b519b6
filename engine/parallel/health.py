"""Which rank died: a failed collective on the leader names the dead rank(s).

Gloo reports only "connection closed by peer"; the launcher records every rank's process
id in ``rank_pids`` (all ranks share the leader's host), so the leader can look for the
process that is gone (or a zombie) when a step fails.
"""

from __future__ import annotations

import time

from engine.parallel.ep import ExpertParallelGroup
from engine.parallel.state import ParallelState

Group = ParallelState | ExpertParallelGroup


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def dead_ranks(group: Group) -> list[int]:
    """Ranks whose process is gone (empty when the pids are unknown)."""
    return [r for r, pid in enumerate(group.rank_pids) if not pid_alive(pid)]


def _label(group: Group) -> str:
    return "TP" if isinstance(group, ParallelState) and group.tp_size > 1 else "EP"


def describe_failure(group: Group, settle_s: float = 2.0) -> str:
    """``"TP rank 1 (pid 4242) died"`` (``EP`` for an expert-parallel group), or what is
    known when no dead process is found. A killed peer's sockets close while its process
    is still exiting, so a collective can fail first: look again for up to ``settle_s``."""
    kind = _label(group)
    deadline = time.monotonic() + (settle_s if group.rank_pids else 0.0)
    while not (dead := dead_ranks(group)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if dead:
        return ", ".join(f"{kind} rank {r} (pid {group.rank_pids[r]})" for r in dead) + " died"
    if not group.rank_pids:
        return f"one {kind} rank of {group.size} failed (rank processes unknown)"
    return f"{kind} collective failed with every one of the {group.size} rank processes alive"
