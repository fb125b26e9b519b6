"""`make serve` (= `pdserve serve` with no flags but the port) from a fresh clone of HEAD:
builds the demo model, starts local Ray, 1 prefill + 1 decode worker and the router,
serves, and stops cleanly on Ctrl-C; and `pdserve serve` on a taken port fails at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import session_pids, wait_session_gone
from tests.waiting import wait_for_line

ROOT = Path(__file__).resolve().parents[2]
BOUND = r"router bound to (http://127\.0\.0\.1:[1-9]\d*); starting"


def fresh_clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A clone of HEAD (only committed files) that runs on this checkout's virtualenv."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    for dep in ("pyproject.toml", "constraints/cpu.txt"):  # the shared venv counts as set up
        os.utime(clone / dep, (0, 0))
    (clone / ".venv").symlink_to(ROOT / ".venv")
    return clone, {"PYTHONPATH": str(clone)}  # import the clone, not the editable install


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not ready in {timeout} s:\n" + log.read_text()
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a local Ray starts in minutes on an overloaded 2-core box
def test_make_serve_answers_then_stops(tmp_path):
    clone, extra = fresh_clone(tmp_path)
    env = {
        **os.environ,
        **extra,
        "PDSERVE_CACHE": str(tmp_path / "cache"),
    }  # demo model built fresh
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    log = log_path.open("w+")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "serve", "SERVE_ARGS=--port 0"],  # the router picks
        cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        url = wait_for_line(log_path, BOUND, proc, timeout=120).group(1)
        wait_healthy(url, proc, log_path)
        body = {"model": "tiny-llama", "prompt": "The quick brown fox", "max_tokens": 8}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        wait_for_line(log_path, rf"pdserve ready in .*: {url}/v1", proc, timeout=30)
        started = session_pids(proc.pid)  # make, pdserve, local Ray, the two workers
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches make and pdserve alike
        # make re-raises the interrupt on itself; it prints "make: *** [...] Error N" when
        # its recipe (pdserve) exits non-zero, so a clean log means pdserve exited 0.
        assert proc.wait(timeout=60) == -signal.SIGINT
        assert "make: ***" not in log_path.read_text(), log_path.read_text()[-3000:]
        wait_session_gone(proc.pid, started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_serve_on_a_taken_port_fails_at_once_naming_it(tiny_model, tmp_path):
    """The router binds its port before it starts anything, so a taken port is an error
    within seconds, not after every worker has started."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "router.launch.cli",
            "serve",
            "--model",
            str(tiny_model("llama")),
        ]
        cmd += ["--port", str(port), "--prefill", "0"]
        env = {**os.environ, "PDSERVE_CACHE": str(tmp_path / "cache")}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "starting Ray" not in out.stderr  # nothing was started
