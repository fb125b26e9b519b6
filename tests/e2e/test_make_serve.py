"""`make serve` (= `pdserve serve` with no flags but the port) from a fresh clone of HEAD:
builds the demo model, starts local Ray, 1 prefill + 1 decode worker and the router,
serves, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A clone of HEAD (only committed files) that runs on this checkout's virtualenv."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    for dep in ("pyproject.toml", "constraints/cpu.txt"):  # the shared venv counts as set up
        os.utime(clone / dep, (0, 0))
    (clone / ".venv").symlink_to(ROOT / ".venv")
    return clone, {"PYTHONPATH": str(clone)}  # import the clone, not the editable install


def test_make_serve_answers_then_stops(tmp_path):
    port = free_port()
    clone, extra = fresh_clone(tmp_path)
    env = {
        **os.environ,
        **extra,
        "PDSERVE_CACHE": str(tmp_path / "cache"),
    }  # demo model built fresh
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"SERVE_ARGS=--port {port}"],
        cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while time.monotonic() - start < 60:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("not ready in 60 s:\n" + (tmp_path / "serve.log").read_text())
        body = {"model": "tiny-llama", "prompt": "The quick brown fox", "max_tokens": 8}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        text = (tmp_path / "serve.log").read_text()
        assert "pdserve ready in" in text and f"{url}/v1" in text
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
