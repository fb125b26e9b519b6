"""Standalone ``pdserve worker --tp-size N`` processes (no Ray: the leader spawns its
follower ranks on this host, router/launch/group_launch.py) for the TP tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.processes import children

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TPWorker:
    proc: subprocess.Popen
    address: str
    followers: list[int]


def launch(model: Path, role: str, worker_id: str, tp: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "WARNING", "worker"]
    cmd += ["--role", role, "--model", str(model), "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--num-kv-blocks", "64", "--worker-id", worker_id, "--tp-size", str(tp)]
    cmd += ["--kv-transport", "tcp", "--kv-transport", "shm", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)


def ready(proc: subprocess.Popen, role: str, worker_id: str, tp: int) -> TPWorker:
    """Its "serving on" line (it binds port 0 and reports the port) and its followers."""
    line = proc.stdout.readline().strip()
    assert re.fullmatch(rf"{role} worker {worker_id} serving on 127\.0\.0\.1:[1-9]\d*", line), line
    followers = children(proc.pid)
    assert len(followers) == tp - 1, followers
    return TPWorker(proc, line.split()[-1], followers)


@contextlib.contextmanager
def workers(model: Path, specs: list[tuple[str, str, int]]):
    """``{worker_id: TPWorker}`` for ``(worker_id, role, tp)`` specs, started together."""
    procs = {wid: (launch(model, role, wid, tp), role, tp) for wid, role, tp in specs}
    try:
        yield {wid: ready(p, role, wid, tp) for wid, (p, role, tp) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
