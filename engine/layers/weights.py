"""Where on-disk tensors go: the targets a model declares, and the slice a layer reads.

A model maps every Hugging Face tensor name to a :class:`WeightTarget` in its own
parameters (a fused QKV layer takes q, k and v as row ranges). A layer that holds only a
shard of a tensor (tensor parallelism, engine/parallel/tp_layers.py) answers
``weight_read(param_name, target)`` with the :class:`WeightRead` of its shard, and the
loader reads just that slice from the safetensors file (``get_slice``); a plain layer
reads the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightTarget:
    """Where one on-disk tensor goes: a parameter, an expert slot and a row range."""

    param: str
    expert: int | None = None
    row_offset: int = 0
    rows: int | None = None
    """``None`` = the whole parameter (or the whole expert slice)."""


@dataclass(frozen=True)
class WeightRead:
    """The part of an on-disk tensor one rank loads, and where it lands."""

    source: tuple[slice, ...] = ()
    """Index into the on-disk tensor (``()``: all of it)."""
    dest_rows: slice | None = None
    """Rows of the destination (after the expert index); ``None``: the target's rows."""
