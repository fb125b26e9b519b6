"""What two workers must agree on before KV pages move between them: the layout spec
their handshake exchanges (``KVLayoutSpec``), built from a worker's :class:`KVLayout`
(``engine/kv_cache/layout.py``), and the model fingerprint it carries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from engine.kv_cache.layout import KVLayout, dtype_from_name, dtype_name
from engine.kv_cache.quant import quant_format, row_bytes

PROTOCOL_VERSION = 1

TP_FIELDS = ("tp_size", "tp_rank", "head_start", "head_end")
"""Where a rank's cache sits in its tensor-parallel group: not compared at pairing (groups
of different TP sizes pair), mapped instead (kv_transfer/tp_map.py)."""


@dataclass(frozen=True)
class KVLayoutSpec:
    """What two workers must agree on before KV pages move between them.

    ``num_kv_heads`` counts the model's KV heads; a rank of a tensor-parallel group holds
    heads ``[head_start, head_end)`` of them (every head without TP)."""

    model_fingerprint: str
    """Hash of the model's config and weight names (see :func:`model_fingerprint`)."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    """Dtype name, e.g. ``bfloat16``."""
    block_size: int
    protocol_version: int = PROTOCOL_VERSION
    kv_cache_dtype: str = "auto"
    """How the pages store K/V (``auto``: as ``dtype``; fp8/int8: quantized rows + scales)."""
    tp_size: int = 1
    tp_rank: int = 0
    head_start: int = 0
    head_end: int = 0
    """End of this rank's heads; 0 = ``num_kv_heads`` (every head)."""

    def __post_init__(self) -> None:
        if not self.kv_cache_dtype:  # a peer from before the field: it stored its dtype
            object.__setattr__(self, "kv_cache_dtype", "auto")
        quant_format(self.kv_cache_dtype)
        if self.head_end == 0:
            object.__setattr__(self, "head_end", self.num_kv_heads)

    @classmethod
    def from_layout(cls, layout: KVLayout, model_fingerprint: str) -> KVLayoutSpec:
        return cls(
            model_fingerprint=model_fingerprint,
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            dtype=dtype_name(layout.dtype),
            block_size=layout.block_size,
            kv_cache_dtype=layout.kv_cache_dtype,
        )

    def for_rank(self, tp_size: int, tp_rank: int, heads: tuple[int, int]) -> KVLayoutSpec:
        """This layout as TP rank ``tp_rank`` of ``tp_size`` holding ``heads`` has it."""
        return replace(
            self, tp_size=tp_size, tp_rank=tp_rank, head_start=heads[0], head_end=heads[1]
        )

    @property
    def group(self) -> KVLayoutSpec:
        """The layout of the whole group (every head), as clusters register it."""
        return replace(self, tp_size=1, tp_rank=0, head_start=0, head_end=self.num_kv_heads)

    @property
    def num_local_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def page_dtype(self) -> torch.dtype:
        """Element type of the pages on the wire (``uint8`` when quantized)."""
        if quant_format(self.kv_cache_dtype) is not None:
            return torch.uint8
        return dtype_from_name(self.dtype)

    def page_block_shape(self, num_heads: int) -> tuple[int, int, int]:
        """Shape of one block of one layer's K (or V) page holding ``num_heads`` heads."""
        return (self.block_size, num_heads, row_bytes(self.kv_cache_dtype, self.head_dim, 1))

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes per token across all layers and heads (the whole group's),
        quantized rows and their scales included: what a transfer moves per token."""
        itemsize = torch.empty((), dtype=self.page_dtype).element_size()
        row = row_bytes(self.kv_cache_dtype, self.head_dim, itemsize)
        return 2 * self.num_layers * self.num_kv_heads * row

    def check_compatible(
        self, other: KVLayoutSpec, *, ours: str = "ours", theirs: str = "theirs"
    ) -> None:
        """Raise ``ValueError`` naming every mismatched field and both values (the TP
        placement fields are not compared: see :data:`TP_FIELDS`)."""
        mine, their = asdict(self), asdict(other)
        diffs = [
            f"{k} mismatch: {ours}={mine[k]}, {theirs}={their[k]}"
            for k in mine
            if k not in TP_FIELDS and mine[k] != their[k]
        ]
        if diffs:
            raise ValueError(
                "KV layout mismatch: "
                + "; ".join(diffs)
                + ". Start both workers with the same model, --dtype, --kv-cache-dtype and "
                "--block-size."
            )

    def to_json(self) -> str:
        """JSON of the fields (the TP placement only when it is not the whole group's)."""
        fields = asdict(self)
        if self == self.group:
            fields = {k: v for k, v in fields.items() if k not in TP_FIELDS}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVLayoutSpec:
        return cls(**json.loads(text))


def model_fingerprint(hf_config: dict, weight_names: Sequence[str]) -> str:
    """Stable short hash identifying a model (config + tensor names)."""
    payload = json.dumps({"config": hf_config, "weights": sorted(weight_names)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
