"""The engine on CUDA in bfloat16 (``auto``: the Triton backend) against HF transformers run
in bfloat16 on the same device, over a 32-prompt set: the first 16 greedy tokens of every
prompt equal HF's, or first differ where HF's own two best logits are a bf16 tie (within
one bf16 step of each other) and the engine took the other one. Every KV block is free
afterwards.

Why not issue 15's "95% of prompts agree" alone: the tiny random models have near-flat
logits, and in bf16 on CPU (``PDSERVE_GPU_MATRIX_ON_CPU=1``) qwen3 agrees on 30/32 and
qwen3_moe on 29/32 prompts, every difference at an exact tie or one bf16 step. Explaining
each difference is stricter than a share, and does not fail on the test model's ties.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy, hf_next_logits, make_prompts

from .conftest import ON_CUDA, device

pytestmark = pytest.mark.gpu

NUM_PROMPTS, TOKENS = 32, 16
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_bf16_greedy_agrees_with_hf_bf16(tiny_model, arch):
    model = tiny_model(arch)
    # 3..63 tokens: within a block, on block boundaries, and chunked over several blocks
    prompts = make_prompts([3 + (7 * i) % 61 for i in range(NUM_PROMPTS)], seed=201)
    llm = LLM(model, device=device(), dtype="bfloat16")
    assert llm.engine.backend.name == ("triton" if ON_CUDA else "torch")  # auto on CUDA
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    want = hf_greedy(model, prompts, TOKENS, dtype="bfloat16", device=device())
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            _assert_bf16_tie(model, prompts[i], g, w)
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks


def _assert_bf16_tie(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    k = next(j for j in range(TOKENS) if got[j] != want[j])
    logits = hf_next_logits(model, prompt + want[:k], dtype="bfloat16", device=device())
    (best, second), (first_id, second_id) = torch.topk(logits, 2)
    step = 2.0 ** (math.floor(math.log2(abs(float(best)))) - 7)  # bf16: 8 significant bits
    tie = float(best - second) <= step and {first_id.item(), second_id.item()} == {got[k], want[k]}
    assert tie, f"token {k} differs from HF ({got[k]} vs {want[k]}) without a bf16 tie: top-2 logits {float(best)}, {float(second)}"  # fmt: skip
