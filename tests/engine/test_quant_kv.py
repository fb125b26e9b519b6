"""``--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8`` in the engine: greedy output agrees
with the model-dtype cache, a broken dequantization is caught, the pool holds about twice
the tokens in the same bytes, and prefix caching and preemption keep working."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kv_cache import quant
from tests.engine.hf_reference import make_prompts
from tests.engine.quant_kv_model import make_decisive_model

NUM_PROMPTS, NEW_TOKENS = 32, 16
MIN_AGREE = 29
"""90% of 32 prompts. Meaningful on the decisive checkpoint (quant_kv_model.py): bf16 K/V
agree 32/32 there, while K/V read without their scale agree 0/32 (see the test below)."""
QUANT = ["fp8_e4m3", "fp8_e5m2", "int8"]
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def prompts() -> list[list[int]]:
    return make_prompts([3 + (i * 37) % 120 for i in range(NUM_PROMPTS)], seed=11)


def greedy(model, kv_cache_dtype: str, **overrides) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=256, **overrides)
    out = [o.token_ids for o in llm.generate(prompts(), PARAMS)]
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks, "KV blocks leaked"
    return out, llm


def agreement(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    return make_decisive_model(tmp_path_factory.mktemp("quant-kv") / "llama")


@pytest.fixture(scope="module")
def dense(decisive) -> list[list[int]]:
    """Greedy tokens with the model-dtype (float32) cache: the reference."""
    return greedy(decisive, "auto")[0]


@pytest.mark.parametrize("kv_cache_dtype", QUANT)
def test_quant_kv_greedy_agrees_with_model_dtype_cache(decisive, dense, kv_cache_dtype):
    """All 32 prompts at once: decode batches, chunked prefill over quantized context."""
    ours, llm = greedy(decisive, kv_cache_dtype)
    assert llm.engine.kv_caches[0][0].dtype == torch.uint8
    assert llm.engine.layout_spec.kv_cache_dtype == kv_cache_dtype
    agree = agreement(ours, dense)
    assert agree >= MIN_AGREE, f"{kv_cache_dtype}: {agree}/{NUM_PROMPTS} prompts agree"


def test_quant_kv_broken_dequantization_is_caught(decisive, dense, monkeypatch):
    """Reading the cache without its scales (a broken dequantization) drops agreement far
    below the threshold: the greedy test above can fail."""

    def without_scale(self, rows, dtype):
        return rows[..., : rows.shape[-1] - quant.SCALE_BYTES].contiguous().view(self.dtype).to(dtype)  # fmt: skip

    monkeypatch.setattr(quant.KVQuantFormat, "dequantize", without_scale)
    ours, _ = greedy(decisive, "int8")
    assert agreement(ours, dense) < NUM_PROMPTS // 2


@pytest.mark.parametrize("kv_cache_dtype", QUANT)
def test_quant_kv_pool_sizes_itself_from_the_byte_budget(tiny_model, kv_cache_dtype):
    """The same byte budget holds 2 x head_dim / (head_dim + 2) times bf16's tokens (1.78x
    at head_dim 16, 1.97x at 128); bytes per token count the scales."""
    budget = 1 << 20
    bf16 = LLM(tiny_model("llama"), dtype="bfloat16", kv_cache_memory_bytes=budget).engine
    q = LLM(
        tiny_model("llama"), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory_bytes=budget,
    ).engine  # fmt: skip
    d, layers, heads = q.spec.head_dim, q.spec.num_layers, q.spec.num_kv_heads
    assert q.layout.bytes_per_token == 2 * layers * heads * (d + 2)
    assert bf16.layout.bytes_per_token == 2 * layers * heads * d * 2
    assert q.layout.num_blocks == budget // (q.layout.block_size * q.layout.bytes_per_token)
    ratio = q.layout.num_blocks / bf16.layout.num_blocks
    assert ratio == pytest.approx(2 * d / (d + 2), rel=0.01)
    held = sum(k.numel() + v.numel() for k, v in q.kv_caches)
    assert held <= budget  # the tensors really are that small


def test_quant_kv_prefix_cache_and_preemption(decisive):
    """fp8 blocks are shared by prefix hits and survive preemption by recompute: a pool
    too small for the batch preempts, and outputs still agree with a roomy fp8 pool."""
    roomy, _ = greedy(decisive, "fp8_e4m3")
    small, llm = greedy(decisive, "fp8_e4m3", num_kv_blocks=24)
    assert llm.engine.scheduler.num_preemptions > 0
    assert agreement(small, roomy) >= MIN_AGREE
    shared = make_prompts([64], seed=5)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = llm.generate([shared + [7, 8, 9]], params)[0]
    again = llm.generate([shared + [7, 8, 9]], params)[0]
    assert again.num_cached_tokens == 64  # four full fp8 blocks, read back from the cache
    assert again.token_ids == first.token_ids
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks
