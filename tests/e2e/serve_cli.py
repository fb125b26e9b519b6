"""``pdserve serve --model M --port 0 <flags>`` as a real process group on its own local
Ray, for the one-command cluster tests with TP or EP workers: started, waited on until
/health lists both workers, stopped with Ctrl-C, and checked to leave no process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.e2e.test_make_serve import BOUND
from tests.processes import cmd_name, session_pids, wait_session_gone
from tests.waiting import wait_for_line

ROOT = Path(__file__).resolve().parents[2]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 200) -> dict:
    """/health's workers once it answers 200 listing two (prefill and decode)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, log.read_text()
        try:
            r = httpx.get(url + "/health", timeout=1)
            workers = r.json().get("workers", {})
            if r.status_code == 200 and len(workers) == 2:
                return workers
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout} s:\n" + log.read_text())


@contextlib.contextmanager
def serving(
    model: Path, flags: list[str], log: Path
) -> Iterator[tuple[subprocess.Popen, str, dict]]:
    """``(proc, router url, /health workers)``; the whole session is killed on exit if it
    is still running (a failed test)."""
    cmd = [sys.executable, "-m", "router.launch.cli", "serve", "--model", str(model), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with log.open("w+") as out:
        proc = subprocess.Popen(
            [*cmd, *flags], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            url = wait_for_line(log, BOUND, proc, timeout=120).group(1)
            yield proc, url, wait_ready(url, proc, log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def ctrl_c_stops_all(proc: subprocess.Popen, log: Path, follower_actor: str) -> None:
    """The session holds the router, local Ray, 2 group leaders (WorkerActor) and their 2
    followers (``follower_actor``); Ctrl-C stops it cleanly and every one of them exits."""
    started = session_pids(proc.pid)
    names = sorted(n for p in started if (n := cmd_name(p)).startswith("ray::"))
    assert names.count("ray::WorkerActor") == 2, names
    assert names.count(f"ray::{follower_actor}") == 2, names
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]  # a clean stop
    wait_session_gone(proc.pid, started)
