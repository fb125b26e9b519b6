"""Bad input gets a clear error naming the value, the limit and the fix; the engine goes on."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import CacheConfig, EngineConfig
from tests.engine.hf_reference import hf_greedy, make_prompts


def _copy(tiny_model, tmp_path, arch="llama"):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model(arch), dst)
    return dst


def test_unsupported_architecture_names_the_supported_list(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"
    ):
        LLM(d)


def test_missing_weight_file(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weight files"):
        LLM(d)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        ValueError, match="missing 1 tensor\\(s\\): model.layers.1.self_attn.k_proj.weight"
    ):
        LLM(d)


def test_corrupt_weight_file_is_named(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read weight file .*model.safetensors"):
        LLM(d)


def test_shape_mismatch_names_tensor_and_shapes(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for tensor model.layers.0.mlp.down_proj.weight in model.safetensors: checkpoint has \(64, 128\), config.json implies \(64, 96\)",
    ):
        LLM(d)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        LLM(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
        (
            {"temperature": -1.0},
            r"temperature must be 0 \(greedy\) or in \[0.01, 100.0\], got -1.0",
        ),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_k": 0}, r"top_k must be in \[1, 2147483647\] or None, got 0"),
        ({"max_tokens": 2, "min_tokens": 3}, r"min_tokens must be in \[0, max_tokens=2\], got 3"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\] or None, got 50"),
    ],
)
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_invalid_cache_config():
    with pytest.raises(ValueError, match="block_size must be a positive power of two, got 12"):
        EngineConfig(model="x", cache=CacheConfig(block_size=12))


def test_bad_requests_are_refused_and_the_engine_keeps_serving(tiny_model):
    d = tiny_model("llama")
    llm = LLM(d, max_model_len=64)
    engine = llm.engine
    good = make_prompts([10], seed=9)[0]
    engine.add_request("ok", good, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    with pytest.raises(ValueError, match="prompt has 64 tokens, but max_model_len is 64"):
        engine.add_request("long", [5] * 64, SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match=r"token id 9999 is outside the vocabulary \[0, 512\)"):
        engine.add_request("oov", [1, 9999], SamplingParams())
    with pytest.raises(ValueError, match="request id 'ok' is already in use"):
        engine.add_request("ok", good, SamplingParams())
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == hf_greedy(d, [good], 8)[0]
    assert engine.num_free_blocks == engine.layout.num_blocks


def test_prompt_larger_than_the_pool_is_refused(tiny_model):
    llm = LLM(tiny_model("llama"), num_kv_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="prompt needs 3 KV blocks but the pool has 2"):
        llm.generate([[5] * 40], SamplingParams(max_tokens=2))
    assert llm.engine.num_free_blocks == 2


def test_generation_stops_at_max_model_len(tiny_model):
    llm = LLM(tiny_model("llama"), max_model_len=20)
    (out,) = llm.generate(
        [[5] * 15], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0.0)
    )
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
