"""`pdserve serve --prefill-tp 2 --decode-tp 2`: the one-command cluster starts TP=2 workers
on its own local Ray, /health lists their tp_size, the real `openai` client gets greedy
output equal to HF (completions and a streamed chat), and Ctrl-C stops it and every
process it started (the TP followers included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.e2e.test_expert_parallel_serve import _wait_ready
from tests.e2e.test_make_serve import BOUND
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.processes import cmd_name, session_pids, wait_session_gone
from tests.waiting import wait_for_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tensor_parallel_serve_with_tp_flags(tiny_model, tmp_path):
    model = tiny_model("qwen3")
    cmd = [sys.executable, "-m", "router.launch.cli", "serve", "--model", str(model), "--port", "0"]
    cmd += ["--prefill-tp", "2", "--decode-tp", "2", "--num-kv-blocks", "64"]
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
            assert sorted((w["role"], w["tp_size"]) for w in workers.values()) == [
                ("decode", 2),
                ("prefill", 2),
            ]
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            name = c.models.list().data[0].id
            prompt = make_prompts([40], seed=87)[0]
            extra = {"ignore_eos": True, "return_token_ids": True}
            out = c.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)  # fmt: skip
            assert out.choices[0].token_ids == hf_greedy(model, [prompt], 8)[0]
            chunks = c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                temperature=0, stream=True, extra_body=extra,
            )  # fmt: skip
            assert sum(len(ch.choices[0].delta.content or "") for ch in chunks if ch.choices) > 0
            started = session_pids(proc.pid)  # router, local Ray, 2 TP leaders, 2 followers
            names = sorted(n for p in started if (n := cmd_name(p)).startswith("ray::"))
            assert names.count("ray::WorkerActor") == 2, names
            assert names.count("ray::TPFollowerActor") == 2, names
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]  # a clean stop
            wait_session_gone(proc.pid, started)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
