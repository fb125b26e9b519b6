"""Sharded checkpoints, the pdserve CLI, and the tiny model builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.tiny_model import make_tiny_model
from tests.engine.hf_reference import hf_greedy, make_prompts


def test_sharded_checkpoint_loads_like_the_single_file(tiny_model, tmp_path):
    src = tiny_model("mixtral")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    prompts = make_prompts([12, 30], seed=21)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = LLM(dst).generate(prompts, params)
    assert [o.token_ids for o in outs] == hf_greedy(src, prompts, 10)


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_model("qwen2", tmp_path / "a")
    b = make_tiny_model("qwen2", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tokenizer_and_chat_template_match_transformers(tiny_model):
    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    d = tiny_model("llama")
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    text = "The quick brown fox, 42 times! Ünïcödé"
    assert ours.encode(text) == theirs.encode(text)
    messages = [{"role": "user", "content": "Hello there"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.decode(ours.encode(text)) == text


def _cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "router.launch.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_make_tiny_model_and_generate(tmp_path):
    res = _cli("make-tiny-model", "--arch", "qwen3", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    res = _cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
    )
    assert res.returncode == 0, res.stderr
    assert "(5 tokens, finish=length)" in res.stdout


def test_cli_builds_the_demo_model_on_first_use(tmp_path):
    res = _cli(
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "3",
        env_extra={"PDSERVE_CACHE": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "tiny-llama" / "config.json").is_file()


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    res = _cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert res.returncode == 2
    assert "error: no config.json in" in res.stderr and "Traceback" not in res.stderr
