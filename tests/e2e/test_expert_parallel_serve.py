"""`pdserve serve --prefill-ep-size 2 --decode-ep-size 2`: the one-command cluster starts EP
workers on its own local Ray, /health lists their ep_size, greedy output equals HF, and
Ctrl-C stops it and every process it started (EP followers included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_make_serve import BOUND
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.processes import cmd_name, session_pids, wait_session_gone
from tests.waiting import wait_for_line

ROOT = Path(__file__).resolve().parents[2]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
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


@pytest.mark.slow
def test_serve_with_ep_flags(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    cmd = [sys.executable, "-m", "router.launch.cli", "serve", "--model", str(model), "--port", "0"]
    cmd += ["--prefill-ep-size", "2", "--decode-ep-size", "2", "--num-kv-blocks", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with log.open("w+") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            url = wait_for_line(log, BOUND, proc, timeout=120).group(1)
            workers = _wait_ready(url, proc, log)
            assert sorted((w["role"], w["ep_size"]) for w in workers.values()) == [
                ("decode", 2),
                ("prefill", 2),
            ]
            prompt = make_prompts([40], seed=83)[0]
            body = {"model": httpx.get(url + "/v1/models").json()["data"][0]["id"]}
            body |= {"prompt": prompt, "max_tokens": 8, "temperature": 0.0}
            body |= {"ignore_eos": True, "return_token_ids": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == hf_greedy(model, [prompt], 8)[0]
            started = session_pids(proc.pid)  # router, local Ray, 2 EP leaders, 2 followers
            names = sorted(n for p in started if (n := cmd_name(p)).startswith("ray::"))
            assert names.count("ray::WorkerActor") == 2, names  # the two EP leaders
            assert names.count("ray::EPFollowerActor") == 2, names
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]  # a clean stop
            wait_session_gone(proc.pid, started)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
