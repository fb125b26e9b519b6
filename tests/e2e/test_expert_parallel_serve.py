"""`pdserve serve --prefill-ep-size 2 --decode-ep-size 2`: the one-command cluster starts EP
workers on its own local Ray, /health lists their ep_size, greedy output equals HF, and
Ctrl-C stops it and every process it started (EP followers included)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.serve_cli import ctrl_c_stops_all, serving
from tests.engine.hf_reference import hf_greedy, make_prompts


@pytest.mark.slow
@pytest.mark.timeout(600)  # a local Ray starts in minutes on an overloaded 2-core box
def test_serve_with_ep_flags(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    flags = ["--prefill-ep-size", "2", "--decode-ep-size", "2", "--num-kv-blocks", "64"]
    log = tmp_path / "serve.log"
    with serving(model, flags, log) as (proc, url, workers):
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
        ctrl_c_stops_all(proc, log, "EPFollowerActor")
