"""Tensor-parallel layers: each takes over a plain layer's parameters (same names, so the
model's weight targets still match) and adds the shard it reads and its collective.

    ColumnParallelLinear   output rows split; fused parts (q|k|v, gate|up) split each:
                               on disk, one part:  [ rank 0 rows | rank 1 rows | ... ]
                               this rank:          [ part 0 rows | part 1 rows | ... ]
                           no communication
    RowParallelLinear      input columns split; y = all_reduce(x_local W_local^T)
    PartialRowLinear       the same shard, no all-reduce (the MoE block reduces once)
    VocabParallelEmbedding rows [v0, v1) of the vocabulary; ids outside give zeros, then
                           one all-reduce
    ParallelLMHead         logits of this rank's vocabulary rows, gathered to rank 0
                           (which alone samples); rank 0 gets ``[N, vocab]``, the others
                           their own columns
    TPSparseMoE            experts split inside each expert (w13 column, w2 row) and the
                           shared expert likewise; one all-reduce of the block's output
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.layers.basic import Linear
from engine.layers.moe import SparseMoE
from engine.layers.weights import WeightRead, WeightTarget


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def rows(self, n: int) -> slice:
        """This rank's equal share of ``n`` rows (``n`` divisible by ``size``)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x


def adopt(cls: type, plain: nn.Module, **attrs) -> nn.Module:
    """A ``cls`` that owns ``plain``'s parameters, buffers and children under the same
    names (``cls`` subclasses ``plain``'s class and adds only ``attrs``)."""
    assert issubclass(cls, type(plain)), (cls, type(plain))
    new = cls.__new__(cls)
    new.__dict__.update(plain.__dict__)
    new.__dict__.update(attrs)
    return new


class ColumnParallelLinear(Linear):
    parts: dict[int, slice]
    """Local row offset of each fused part -> the rows of its on-disk tensor read here."""

    def weight_read(self, name: str, target: WeightTarget) -> WeightRead:
        return WeightRead((self.parts[target.row_offset],))


class PartialRowLinear(Linear):
    cols: slice
    """The input columns of the on-disk weight this rank holds."""

    def weight_read(self, name: str, target: WeightTarget) -> WeightRead:
        if name == "bias":
            raise ValueError("a row-parallel layer with a bias is not supported")
        return WeightRead((slice(None), self.cols))


class RowParallelLinear(PartialRowLinear):
    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    tp: TPGroup
    vocab: tuple[int, int]
    """Global token ids ``[v0, v1)`` this rank holds (rows past ``v1 - v0`` are padding)."""

    def weight_read(self, name: str, target: WeightTarget) -> WeightRead:
        v0, v1 = self.vocab
        return WeightRead((slice(v0, v1),), slice(0, v1 - v0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v0, v1 = self.vocab
        outside = (ids < v0) | (ids >= v1)
        out = F.embedding((ids - v0).masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside[:, None], 0))


def gather_logits(local: torch.Tensor, tp: TPGroup, vocab_size: int) -> torch.Tensor:
    """Rank 0: every rank's columns side by side, padding cut; others: ``local``."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(local, parts, dst=0, group=tp.group)
    return torch.cat(parts, dim=-1)[..., :vocab_size] if parts is not None else local


class ParallelLMHead(Linear):
    tp: TPGroup
    vocab: tuple[int, int]
    vocab_size: int

    weight_read = VocabParallelEmbedding.weight_read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_logits(super().forward(x), self.tp, self.vocab_size)


class TiedParallelLMHead(nn.Module):
    """The LM head of a model with tied embeddings: this rank's embedding rows."""

    def __init__(self, embed: VocabParallelEmbedding, vocab_size: int) -> None:
        super().__init__()
        object.__setattr__(self, "_embed", embed)  # not a child: its weight loads once
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed = self._embed
        return gather_logits(F.linear(x, embed.weight), embed.tp, self.vocab_size)


class TPSparseMoE(SparseMoE):
    tp: TPGroup
    inter: int
    """Each expert's intermediate rows on this rank (of ``inter * tp.size``)."""

    def weight_read(self, name: str, target: WeightTarget) -> WeightRead:
        rows = self.tp.rows(self.inter * self.tp.size)
        return WeightRead((rows,) if name == "w13" else (slice(None), rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))
