"""Quantized weights (compressed-tensors FP8 / INT8) against HF transformers loading the
same quantized checkpoint.

Tolerances: in float32 both sides dequantize the same 8-bit weights with the same scales
and differ only in summation order, so the log-probabilities of the first decode step
agree to 1e-3 (they span tens of nats on these checkpoints; a lost scale or a wrong
group moves them by whole nats). In bfloat16 both round differently here and there, so
greedy agreement is counted per prompt (>= 90% of 32 prompts, 16 tokens each).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.quant.checkpoints import PRESETS, build, dequantized_copy

NUM_PROMPTS, NEW_TOKENS, TOP = 32, 16, 20
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def qroot(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-models")


def _hf(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize("preset", PRESETS)
def test_quant_first_decode_step_logprobs_match_hf(qroot, preset):
    d = build(qroot, "llama", preset)
    prompts = make_prompts([5, 19, 40], seed=31)
    llm = LLM(d)
    assert llm.engine.model.layers[0].attn.qkv.quant is not None  # the 8-bit path ran
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=TOP)
    hf = _hf(d)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        want = _hf_logprobs(hf, prompt + out.token_ids[:1])  # the first decode step
        got = out.logprobs[1]
        assert out.token_ids[1] == int(want.argmax())
        diff = max(abs(lp - float(want[t])) for t, lp in got.items())
        assert diff < LOGPROB_TOL, f"{preset}: logprobs differ from HF by {diff}"
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks


@pytest.mark.parametrize("preset", PRESETS)
def test_quant_bf16_greedy_agrees_with_hf(qroot, preset):
    """bf16 activations take the CPU decode kernels (int8 packed mm for per-channel
    INT8); 32 prompts at once, so decode batches and chunked prefill mix."""
    d = build(qroot, "llama", preset)
    prompts = make_prompts([3 + (i * 37) % 120 for i in range(NUM_PROMPTS)], seed=11)
    llm = LLM(d, dtype="bfloat16", max_num_batched_tokens=256)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    want = hf_greedy(d, prompts, NEW_TOKENS, dtype="bfloat16")
    agree = sum(o == w for o, w in zip(ours, want, strict=True))
    assert agree >= 0.9 * NUM_PROMPTS, f"{preset}: {agree}/{NUM_PROMPTS} prompts agree"
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks


@pytest.mark.parametrize(("arch", "preset"), [("qwen2", "int8"), ("qwen3", "fp8-tensor")])
def test_quant_other_dense_archs_equal_hf(qroot, arch, preset):
    """Qwen2: QKV bias beside an 8-bit weight, tied embeddings; Qwen3: q/k norms."""
    d = build(qroot, arch, preset)
    prompts = make_prompts([4, 17, 33], seed=5)
    outs = LLM(d).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(d, prompts, 12)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_quant_moe_attention_and_shared_expert(qroot, arch):
    """MoE: attention, dense and shared-expert linears quantized, routed experts dense.
    HF cannot load a quantized MoE checkpoint (its expert merging meets no tensors), so
    the reference is HF on the package-decompressed copy: the same weights."""
    d = build(qroot, arch, "fp8")
    dense = dequantized_copy(d, qroot / f"{arch}-fp8-dequantized")
    prompts = make_prompts([6, 21], seed=8)
    outs = LLM(d).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(dense, prompts, 12)
