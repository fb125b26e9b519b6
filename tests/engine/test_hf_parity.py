"""Greedy output equals HF transformers token for token, for every architecture and mode."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import ALL_ARCHS
from tests.engine.hf_reference import hf_greedy, make_prompts

MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def _check(llm: LLM, model_dir, prompts) -> list:
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, MAX_NEW)
    assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks
    return outs


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_batch_of_different_lengths(tiny_model, arch):
    d = tiny_model(arch)
    _check(LLM(d), d, make_prompts([3, 17, 33, 64, 9]))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_prefixes_hit_the_cache(tiny_model, arch):
    d = tiny_model(arch)
    prefix = make_prompts([40], seed=1)[0]
    suffixes = make_prompts([5, 11, 2], seed=2)
    prompts = [prefix + s for s in suffixes]
    llm = LLM(d, block_size=16)
    _check(llm, d, prompts[:1])
    outs = _check(llm, d, prompts[1:])
    assert all(o.num_cached_tokens == 32 for o in outs)  # two full 16-token blocks


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_chunked_prefill(tiny_model, arch):
    d = tiny_model(arch)
    prompts = make_prompts([50, 23, 37], seed=3)
    llm = LLM(d, max_num_batched_tokens=16)
    assert max(map(len, prompts)) > 16
    _check(llm, d, prompts)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_preemption_with_a_tiny_pool(tiny_model, arch):
    d = tiny_model(arch)
    prompts = make_prompts([30, 26, 40, 21], seed=4)
    llm = LLM(d, block_size=16, num_kv_blocks=8)
    _check(llm, d, prompts)
    assert llm.engine.scheduler.num_preemptions > 0
