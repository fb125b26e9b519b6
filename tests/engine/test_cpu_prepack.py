"""On the CPU the loader leaves one copy of each weight: oneDNN's prepacked layout."""

from __future__ import annotations

import pytest
import torch

from engine.layers.basic import Linear, can_prepack
from engine.layers.moe import SparseMoE
from engine.loader import load_model

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.zeros(2, 2)), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_and_experts_keep_only_the_packed_copy(tiny_model, arch, dtype):
    model = load_model(tiny_model(arch), dtype).model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.packed.is_mkldnn for m in linears)
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert all(m.w13 is None and len(m.w13_packed) == m.spec.num_experts for m in moes)
    assert (arch == "qwen2_moe") == bool(moes)
    # What stays as plain parameters: embeddings, norms, biases (no second weight copy).
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    assert names <= {"weight", "bias"}
    assert not any(n.endswith(("qkv.weight", "gate_up.weight", "down.weight", "o.weight"))
                   for n, _ in model.named_parameters())  # fmt: skip


def test_cuda_or_fp16_weights_are_not_packed():
    assert not can_prepack(torch.zeros(2, 2, dtype=torch.float16))
    assert not can_prepack(torch.zeros(2, 2, 2))
