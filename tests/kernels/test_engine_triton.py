"""Greedy generation with the ``triton`` backend equals the ``torch`` backend, end to end.

Without CUDA the kernels run under the Triton interpreter (see ``conftest.py``).
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

# Lengths straddle block boundaries (block size 16); the last two share a 20-token
# prefix so the second one starts from a prefix-cache hit.
PROMPTS = [
    [5, 9, 2],
    list(range(3, 20)),
    [7] * 33,
    list(range(40, 60)) + [1, 2, 3],
    list(range(40, 60)) + [8, 9],
]


def _generate(model_dir, backend: str, **engine_kwargs) -> list[list[int]]:
    llm = LLM(model_dir, attention_backend=backend, **engine_kwargs)
    assert llm.engine.backend.name == backend
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    assert outputs[-1].num_cached_tokens > 0  # the shared prefix was a cache hit
    return [out.token_ids for out in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_triton_greedy_equals_torch(tiny_model, arch):
    model_dir = tiny_model(arch)
    # A small token budget forces chunked prefill (prefill rows over cached context)
    # and mixed decode + prefill steps.
    kwargs = {"max_num_batched_tokens": 24}
    want = _generate(model_dir, "torch", **kwargs)
    got = _generate(model_dir, "triton", **kwargs)
    assert got == want
    assert all(len(ids) == 8 for ids in want)
