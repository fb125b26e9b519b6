"""Greedy generation with the ``triton`` backend equals the ``torch`` backend, end to end.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (see
``conftest.py``); with CUDA they are compiled and run on the device (``gpu`` marker). Both
backends run in float32 on the same device, so they must agree token for token.
"""

from __future__ import annotations

import pytest
import torch

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


DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="the Triton interpreter runs only without CUDA"
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _generate(model_dir, backend: str, **engine_kwargs) -> list[list[int]]:
    llm = LLM(model_dir, attention_backend=backend, dtype="float32", **engine_kwargs)
    assert llm.engine.backend.name == backend
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    assert outputs[-1].num_cached_tokens > 0  # the shared prefix was a cache hit
    return [out.token_ids for out in outputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_triton_greedy_equals_torch(tiny_model, arch, device):
    model_dir = tiny_model(arch)
    # A small token budget forces chunked prefill (prefill rows over cached context)
    # and mixed decode + prefill steps.
    kwargs = {"max_num_batched_tokens": 24, "device": device}
    want = _generate(model_dir, "torch", **kwargs)
    got = _generate(model_dir, "triton", **kwargs)
    assert got == want
    assert all(len(ids) == 8 for ids in want)
