"""Tensor parallelism applied from outside the model (as gpt-fast's ``tp.py``): the plain
model is built from this rank's shard of the spec, then its layers are swapped for the
parallel ones of engine/parallel/tp_layers.py, which know the slice each rank reads.

Rank ``r`` of ``t`` holds, Megatron-style::

    attention   q heads [r*Hq/t, (r+1)*Hq/t); KV heads kv_head_range(Hkv, t, r): a split
                when Hkv >= t, else one head, replicated over t/Hkv ranks; o row-parallel
    MLP         gate|up rows [r*I/t, (r+1)*I/t), down row-parallel (one all-reduce)
    MoE         every expert split the same way; router replicated; one all-reduce
    vocabulary  rows [r*ceil(V/t), ...) of the embedding and LM head (padded; the
                embedding all-reduces, the LM head gathers logits to rank 0)
    norms       replicated
"""

from __future__ import annotations

from dataclasses import replace

from engine.kv_cache.layout import kv_head_range
from engine.layers.attention import Attention
from engine.layers.basic import GatedMLP, Linear
from engine.layers.moe import SparseMoE
from engine.model_spec import ModelSpec
from engine.parallel.tp_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    PartialRowLinear,
    RowParallelLinear,
    TiedParallelLMHead,
    TPGroup,
    TPSparseMoE,
    VocabParallelEmbedding,
    adopt,
)


def vocab_range(vocab_size: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Token ids ``[v0, v1)`` of rank ``rank``'s padded ``ceil(V / t)``-row shard."""
    per = -(-vocab_size // tp_size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


def _divides(what: str, value: int, tp_size: int) -> None:
    if value % tp_size:
        raise ValueError(
            f"{what}={value} is not divisible by tp_size={tp_size}; "
            f"pick a --tp-size that divides {value}"
        )


def check_tp(spec: ModelSpec, tp_size: int) -> None:
    """Raise naming the field when ``spec`` cannot be split over ``tp_size`` ranks."""
    _divides("num_attention_heads", spec.num_heads, tp_size)
    h = spec.num_kv_heads
    if (h % tp_size if h >= tp_size else tp_size % h) != 0:
        raise ValueError(
            f"num_key_value_heads={h} and tp_size={tp_size}: one must divide the other "
            "(KV heads are split, or replicated when fewer than the ranks)"
        )
    if spec.intermediate_size and not _all_sparse(spec):
        _divides("intermediate_size", spec.intermediate_size, tp_size)
    if spec.moe is not None:
        _divides("moe_intermediate_size", spec.moe.intermediate_size, tp_size)
        if spec.moe.shared_expert_intermediate_size:
            _divides("shared_expert_intermediate_size", spec.moe.shared_expert_intermediate_size, tp_size)  # fmt: skip


def _all_sparse(spec: ModelSpec) -> bool:
    return spec.moe is not None and len(spec.moe.sparse_layers) == spec.num_layers


def shard_spec(spec: ModelSpec, tp_size: int) -> ModelSpec:
    """The spec of one rank's shard: the plain model built from it has local shapes."""
    check_tp(spec, tp_size)
    moe = spec.moe
    if moe is not None:
        moe = replace(
            moe,
            intermediate_size=moe.intermediate_size // tp_size,
            shared_expert_intermediate_size=moe.shared_expert_intermediate_size // tp_size,
        )
    start, end = kv_head_range(spec.num_kv_heads, tp_size, 0)
    return replace(
        spec,
        num_heads=spec.num_heads // tp_size,
        num_kv_heads=end - start,
        intermediate_size=0 if _all_sparse(spec) else spec.intermediate_size // tp_size,
        vocab_size=-(-spec.vocab_size // tp_size),
        moe=moe,
    )


def apply_tp(model, spec: ModelSpec, tp: TPGroup) -> None:
    """Swap ``model``'s layers (built from ``shard_spec``) for tensor-parallel ones."""
    vocab = vocab_range(spec.vocab_size, tp.size, tp.rank)
    model.embed = adopt(VocabParallelEmbedding, model.embed, tp=tp, vocab=vocab)
    if model.lm_head is None:
        model.lm_head = TiedParallelLMHead(model.embed, spec.vocab_size)
    else:
        model.lm_head = adopt(ParallelLMHead, model.lm_head, tp=tp, vocab=vocab, vocab_size=spec.vocab_size)  # fmt: skip
    for layer in model.layers:
        _attention(layer.attn, spec, tp)
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = _moe(layer.mlp, spec, tp)
        else:
            _mlp(layer.mlp, tp, RowParallelLinear)


def _attention(attn: Attention, spec: ModelSpec, tp: TPGroup) -> None:
    d, q, kv = spec.head_dim, attn.q_size, attn.kv_size
    k0, _ = kv_head_range(spec.num_kv_heads, tp.size, tp.rank)
    k_rows = slice(k0 * d, k0 * d + kv)
    parts = {0: slice(tp.rank * q, (tp.rank + 1) * q), q: k_rows, q + kv: k_rows}
    attn.qkv = adopt(ColumnParallelLinear, attn.qkv, parts=parts)
    attn.o = _row(attn.o, q, tp, RowParallelLinear)


def _mlp(mlp: GatedMLP, tp: TPGroup, down: type) -> None:
    inter = mlp.intermediate
    rows = slice(tp.rank * inter, (tp.rank + 1) * inter)
    mlp.gate_up = adopt(ColumnParallelLinear, mlp.gate_up, parts={0: rows, inter: rows})
    mlp.down = _row(mlp.down, inter, tp, down)


def _row(linear: Linear, cols: int, tp: TPGroup, cls: type) -> Linear:
    return adopt(cls, linear, cols=slice(tp.rank * cols, (tp.rank + 1) * cols), tp=tp)


def _moe(moe: SparseMoE, spec: ModelSpec, tp: TPGroup) -> TPSparseMoE:
    if moe.shared is not None:
        _mlp(moe.shared, tp, PartialRowLinear)  # partial sums: the block reduces once
    return adopt(TPSparseMoE, moe, tp=tp, inter=moe.spec.intermediate_size)
