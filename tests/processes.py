"""Processes a test started: those left in a session, their names, waiting for them to go."""

from __future__ import annotations

import time
from pathlib import Path


def session_pids(sid: int) -> set[int]:
    """Live processes of session ``sid`` (zombies count as gone)."""
    out = set()
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in "ZX":
            out.add(int(entry.name))
    return out


def cmd_name(pid: int) -> str:
    """The first word of ``pid``'s command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def wait_session_gone(sid: int, started: set[int], timeout: float = 60.0) -> None:
    """Every process of ``started`` still in session ``sid`` exits within ``timeout``."""
    deadline = time.monotonic() + timeout
    while left := session_pids(sid) & started:
        names = {p: cmd_name(p) for p in left}
        assert time.monotonic() < deadline, f"processes left after stop: {names}"
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    """Follower ranks (multiprocessing spawn children) of ``pid``: what a TP or EP leader
    started as local processes."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out
