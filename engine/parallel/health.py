"""Which EP rank died: a failed collective on the leader names the dead rank(s).

Gloo reports only "connection closed by peer"; the launcher records every rank's process
id in ``ExpertParallelGroup.rank_pids`` (all ranks share the leader's host), so the leader
can look for the process that is gone (or a zombie) when a step fails.
"""

from __future__ import annotations

from engine.parallel.ep import ExpertParallelGroup


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def dead_ranks(ep: ExpertParallelGroup) -> list[int]:
    """Ranks whose process is gone (empty when the pids are unknown)."""
    return [r for r, pid in enumerate(ep.rank_pids) if not pid_alive(pid)]


def describe_failure(ep: ExpertParallelGroup) -> str:
    """``"EP rank 1 (pid 4242) died"``, or what is known when no dead process is found."""
    dead = dead_ranks(ep)
    if dead:
        return ", ".join(f"EP rank {r} (pid {ep.rank_pids[r]})" for r in dead) + " died"
    if not ep.rank_pids:
        return f"an EP rank of {ep.size} failed (rank processes unknown)"
    return f"an EP collective failed with every one of the {ep.size} rank processes alive"
