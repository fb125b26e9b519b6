"""The Triton path of a quantized KV cache (on CUDA compiled, else interpreted): the
dequantizing gather kernel equals the torch dequantization, and the quantized Triton
backend matches the quantized torch backend on a whole mixed step."""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE, TOLERANCE, randn
from test_triton_backend import _step

from engine.attention import get_backend
from engine.attention.quant_backend import QuantTorchAttentionBackend
from engine.attention.quant_triton_backend import QuantTritonAttentionBackend
from engine.kernels.dequant_kv import dequant_blocks
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.quant import FORMATS, dequantize_blocks

QUANT = sorted(FORMATS)


def quant_cache(name: str, num_blocks: int, block_size: int, heads: int, head_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_blocks, block_size, heads, head_dim), generator=g) * 4
    return FORMATS[name].quantize(x).to(DEVICE)


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kv_dequant_kernel_matches_torch(name, dtype):
    cache = quant_cache(name, 9, 16, 2, 24, seed=1)  # head_dim 24: masked lanes too
    ids = torch.tensor([7, 0, 3, 3, 8], device=DEVICE)
    got = dequant_blocks(FORMATS[name], cache, ids, dtype)
    want = dequantize_blocks(FORMATS[name], cache, ids, dtype)
    assert got.shape == (5, 16, 2, 24) and got.dtype == dtype
    # Exact in fp32; in bf16 within one rounding of the final cast (the interpreter's
    # fp32 -> bf16 conversion does not round to nearest as torch's does).
    rtol = 0.0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert got.abs().max() > 1.0  # the scales were applied


@pytest.mark.parametrize("name", QUANT)
def test_quant_kv_triton_backend_matches_torch_backend(name):
    """Decodes (one at a block boundary), a fresh prompt and a chunk after a prefix; both
    backends store the same bytes and attend over the same dequantized K/V (the torch
    one given no step K/V, so it too reads the fresh prompt back from the cache)."""
    block_size, heads, kv_heads, head_dim, num_blocks = 16, 4, 2, 32, 12
    ctx_lens, q_lens, num_decodes = [0, 31, block_size, 0, 20], [1, 1, 1, 13, 6], 3
    layout = KVLayout(1, num_blocks, block_size, kv_heads, head_dim, kv_cache_dtype=name)
    meta = _step(ctx_lens, q_lens, num_decodes, block_size, num_blocks)
    n = sum(q_lens)
    query = randn((n, heads, head_dim), torch.float32, seed=2)
    key = randn((n, kv_heads, head_dim), torch.float32, seed=3)
    value = randn((n, kv_heads, head_dim), torch.float32, seed=4)
    base = quant_cache(name, num_blocks, block_size, kv_heads, head_dim, seed=5)
    outs, caches = [], []
    for backend in (QuantTritonAttentionBackend(name), QuantTorchAttentionBackend(name)):
        k, v = base.clone(), base.flip(0).contiguous()
        assert k.shape == layout.cache_shape and k.dtype == layout.storage_dtype
        backend.store_kv(key, value, k, v, meta)
        outs.append(backend.forward(query, k, v, meta, scale=head_dim**-0.5))
        caches.append((k, v))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    torch.testing.assert_close(outs[0], outs[1], **TOLERANCE[torch.float32])


def test_quant_kv_registry_builds_the_quantized_backends():
    assert isinstance(get_backend("triton", "cuda", "fp8_e4m3"), QuantTritonAttentionBackend)
    assert isinstance(get_backend("auto", "cpu", "int8"), QuantTorchAttentionBackend)
    assert get_backend("auto", "cuda", "fp8_e5m2").name == "triton+fp8_e5m2"


@pytest.mark.parametrize("name", ["fp8_e4m3", "int8"])
def test_quant_kv_triton_engine_agrees_with_torch(tmp_path, name):
    """Greedy generation with a quantized cache through the Triton backend (interpreted
    on CPU, compiled on CUDA) on the decisive checkpoint: the same tokens as the torch
    backend's quantized cache on >= 7 of 8 prompts (the two differ only where a fresh
    prompt attends over its own K/V, unquantized in torch, read back in Triton)."""
    from engine import LLM, SamplingParams
    from tests.engine.hf_reference import make_prompts
    from tests.engine.quant_kv_model import make_decisive_model

    model = make_decisive_model(tmp_path / "llama")
    prompts = make_prompts([5, 17, 33, 20, 40, 9, 16, 27], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model, attention_backend=backend, kv_cache_dtype=name, device=str(DEVICE),
                  max_num_batched_tokens=48)  # fmt: skip
        assert llm.engine.backend.name == f"{backend}+{name}"
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.num_free_blocks == llm.engine.layout.num_blocks
    assert sum(a == b for a, b in zip(outs["torch"], outs["triton"], strict=True)) >= 7
