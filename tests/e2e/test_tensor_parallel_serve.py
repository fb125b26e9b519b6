"""`pdserve serve --prefill-tp 2 --decode-tp 2`: the one-command cluster starts TP=2 workers
on its own local Ray, /health lists their tp_size, the real `openai` client gets greedy
output equal to HF (completions and a streamed chat), and Ctrl-C stops it and every
process it started (the TP followers included)."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.serve_cli import ctrl_c_stops_all, serving
from tests.engine.hf_reference import hf_greedy, make_prompts


@pytest.mark.slow
@pytest.mark.timeout(600)  # a local Ray starts in minutes on an overloaded 2-core box
def test_tensor_parallel_serve_with_tp_flags(tiny_model, tmp_path):
    model = tiny_model("qwen3")
    flags = ["--prefill-tp", "2", "--decode-tp", "2", "--num-kv-blocks", "64"]
    log = tmp_path / "serve.log"
    with serving(model, flags, log) as (proc, url, workers):
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
        ctrl_c_stops_all(proc, log, "TPFollowerActor")
