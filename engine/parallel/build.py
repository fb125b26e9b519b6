"""How a rank's model is built for its place in the replica (the loader's one call into
parallelism): the spec of its shard, the experts it holds, and the parallel layers swapped
in before the weights load (each reads its own slice, engine/layers/weights.py)."""

from __future__ import annotations

from engine.kv_cache.layout import kv_head_range
from engine.model_spec import ModelSpec
from engine.parallel.ep_layers import apply_ep, ep_expert_range
from engine.parallel.state import ParallelState
from engine.parallel.tp import apply_tp, shard_spec
from engine.parallel.tp_layers import TPGroup


def tp_group(parallel: ParallelState) -> TPGroup:
    return TPGroup(parallel.rank, parallel.tp_size, parallel.group)


def local_spec(spec: ModelSpec, parallel: ParallelState) -> ModelSpec:
    """The spec whose plain model has this rank's shapes."""
    return shard_spec(spec, parallel.tp_size) if parallel.tp_size > 1 else spec


def expert_range(spec: ModelSpec, parallel: ParallelState) -> tuple[int, int] | None:
    """MoE experts ``[start, end)`` this rank holds (``None``: all of them)."""
    return ep_expert_range(spec, parallel.ep) if parallel.ep_size > 1 else None


def apply_parallel(model, spec: ModelSpec, parallel: ParallelState) -> None:
    """Swap in this rank's parallel layers (nothing on a single rank)."""
    if parallel.tp_size > 1:
        apply_tp(model, spec, tp_group(parallel))
    elif parallel.ep_size > 1:
        apply_ep(model, parallel.ep)


def kv_heads(spec: ModelSpec, parallel: ParallelState) -> tuple[int, int]:
    """Global KV heads ``[start, end)`` in this rank's cache."""
    return kv_head_range(spec.num_kv_heads, parallel.tp_size, parallel.rank % parallel.tp_size)


def describe_rank(parallel: ParallelState, heads: tuple[int, int]) -> str:
    """``", TP rank 1 of 2, KV heads 2-3"`` for a log line (empty on a single rank)."""
    if parallel.kind == "single":
        return ""
    note = f", {parallel.kind.upper()} rank {parallel.rank} of {parallel.size}"
    return note + (f", KV heads {heads[0]}-{heads[1] - 1}" if parallel.tp_size > 1 else "")
