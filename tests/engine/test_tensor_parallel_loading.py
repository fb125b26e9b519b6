"""Each TP rank loads only its shard (no processes: loading needs no collective).

On a checkpoint of a few million weights, rank r of 2 reads about half the bytes from the
safetensors file (``get_slice``; only norms and MoE routers are read whole) and keeps
about half of them resident (oneDNN-packed copies included), for a dense and an MoE
model; a TP size that does not divide the heads is refused naming the field.
"""

from __future__ import annotations

import pytest
import torch

import engine.loader as loader_mod
from engine.loader import load_model
from engine.parallel.state import ParallelState
from engine.tiny_model import make_tiny_model

BIG = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
}
WHOLE = ("norm.weight", "layernorm.weight", ".gate.weight", "shared_expert_gate.weight")
"""Tensors every rank holds whole (replicated)."""
SAFE_OPEN = loader_mod.safe_open


def resident_bytes(model: torch.nn.Module) -> int:
    """Weights held by ``model``: parameters and the oneDNN-packed copies."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        packed = [getattr(m, "packed", None), *(getattr(m, "w13_packed", None) or ()), *(getattr(m, "w2_packed", None) or ())]  # fmt: skip
        total += sum(t.numel() * t.element_size() for t in packed if t is not None)
    return total


class _Reads:
    """Records every tensor the loader reads from disk: name -> (whole?, bytes)."""

    def __init__(self, monkeypatch) -> None:
        self.seen: dict[str, tuple[bool, int]] = {}
        real = SAFE_OPEN
        reads = self

        class Handle:
            def __init__(self, *a, **kw):
                self.f = real(*a, **kw)

            def __enter__(self):
                self.inner = self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                t = self.inner.get_tensor(name)
                reads.seen[name] = (True, t.numel() * t.element_size())
                return t

            def get_slice(self, name):
                sl = self.inner.get_slice(name)

                class Slice:
                    def __getitem__(self, idx):
                        t = sl[idx]
                        reads.seen[name] = (False, t.numel() * t.element_size())
                        return t

                return Slice()

        monkeypatch.setattr(loader_mod, "safe_open", Handle)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.seen.values())


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("big") / "llama", overrides=BIG)


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_tensor_parallel_rank_reads_and_holds_half(arch, big_llama, tiny_model, monkeypatch):
    model_dir = big_llama if arch == "llama" else tiny_model(arch)
    full = _Reads(monkeypatch)
    whole_bytes = resident_bytes(load_model(model_dir).model)
    assert full.total == whole_bytes > 1_000_000 or arch != "llama"
    for rank in range(2):
        reads = _Reads(monkeypatch)
        model = load_model(model_dir, parallel=ParallelState(rank, tp_size=2)).model
        whole = sorted(n for n, (w, _) in reads.seen.items() if w)
        assert whole and all(n.endswith(WHOLE) for n in whole), whole
        assert set(reads.seen) == set(full.seen)  # every tensor, each rank its part
        assert 0.45 < reads.total / full.total < 0.56, (rank, reads.total, full.total)
        assert 0.45 < resident_bytes(model) / whole_bytes < 0.56, rank


def test_tensor_parallel_size_that_does_not_divide_is_refused(tiny_model):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp_size=3"):
        load_model(tiny_model("llama"), parallel=ParallelState(0, tp_size=3))
