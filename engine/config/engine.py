"""Typed configuration for the engine: one frozen dataclass per component."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from engine.config.fields import cli_default, flag, per_role
from engine.kv_cache.quant import KV_CACHE_DTYPES, KVCacheDType

DTypeName = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of CPUs with native bf16 matmul (x86 AVX512-BF16 / AMX, Arm BF16)."""


@cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (x86 ``flags``, Arm ``Features``), or empty."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype ``config.json`` says the weights are stored in (``None`` if unsaid)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    return value if isinstance(value, str) else None


def resolve_dtype(
    name: str, device: str, stored: str | None, flags: frozenset[str] | None = None
) -> torch.dtype:
    """The dtype to run in. ``auto``: bfloat16 on CUDA; on a CPU, bfloat16 when it has
    native bf16 matmul and the checkpoint is stored in 16 bits (as real checkpoints are),
    float32 otherwise -- a float32 checkpoint keeps float32 (token-exact with HF fp32)."""
    if name != "auto":
        return _DTYPES[name]
    if str(device).startswith("cuda"):
        return torch.bfloat16
    native = bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
    return torch.bfloat16 if native and stored in ("bfloat16", "float16") else torch.float32


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = field(default=None, metadata=flag("--num-kv-blocks"))
    """Blocks in the pool; ``None`` sizes the pool from ``kv_cache_memory_bytes``."""
    kv_cache_memory_bytes: int = field(default=256 * 1024 * 1024, metadata=flag(None))
    """Memory budget for K and V of all layers when ``num_blocks`` is ``None`` (an fp8 or
    int8 cache fits about twice the tokens of a bf16 one in it)."""
    kv_cache_dtype: KVCacheDType = "auto"
    """KV cache storage: ``auto`` (the model's dtype), or ``fp8_e4m3``, ``fp8_e5m2``,
    ``int8`` with a scale per token and KV head (half the bytes of bf16 per token, in
    the pool and on the wire); prefill and decode workers must use the same."""
    enable_prefix_caching: bool = field(default=True, metadata=flag("--no-prefix-caching"))
    """Reuse full blocks whose chained token hash matches an earlier request (the flag
    turns it off)."""
    shared_memory: bool = field(default=False, metadata=flag(None))
    """Allocate the KV cache where a prefill worker on the same host can write into it (a
    memfd; on CUDA one device buffer shared by IPC), so the shm transport moves each byte
    once (engine/kv_cache/shared_pool.py). Decode workers serving shm turn it on."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size must be a positive power of two, got {self.block_size}; "
                "try --block-size 16"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of "
                f"{list(KV_CACHE_DTYPES)}"
            )
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching scheduler settings."""

    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunk tokens)."""
    max_num_seqs: int = 128
    """Most sequences in one step."""
    enable_chunked_prefill: bool = field(default=True, metadata=flag(None))
    """Split a prompt that does not fit the step budget across steps."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ParallelConfig:
    """How one model replica spreads over ranks (tensor- or expert-parallel, not both)."""

    ep_size: int = field(default=1, metadata=per_role())
    """Expert-parallel ranks serving the replica (MoE models; must divide num_experts)."""
    tp_size: int = field(default=1, metadata=per_role("tp"))
    """Tensor-parallel ranks serving the replica: each holds 1/N of every layer and of
    the KV heads (must divide the attention heads)."""

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.tp_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got {self.tp_size}/{self.ep_size}")
        if self.tp_size > 1 and self.ep_size > 1:
            raise ValueError(
                f"--tp-size {self.tp_size} with --ep-size {self.ep_size}: a replica is "
                "tensor- or expert-parallel, not both; for an MoE model --tp-size splits "
                "every expert, --ep-size spreads the experts"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything an :class:`~engine.engine.LLMEngine` needs."""

    model: str = field(metadata=cli_default(None, "the tiny demo model"))
    """Local directory of a Hugging Face checkpoint (config.json + safetensors)."""
    dtype: DTypeName = "auto"
    """Weights and KV dtype; ``auto``: bfloat16 on CUDA, and on CPUs with native bf16
    matmul (AVX512-BF16/AMX) for 16-bit checkpoints; float32 otherwise (see
    :func:`resolve_dtype`)."""
    device: str = field(default="cpu", metadata=cli_default("auto", "cuda if available"))
    """Torch device to run on: cpu, cuda, cuda:N, or auto (cuda if available, else cpu:
    resolved on the worker's own node)."""
    max_model_len: int | None = None
    """Longest prompt + output; ``None`` = the model's ``max_position_embeddings``."""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """``auto``, ``torch`` or ``triton`` (``auto`` = triton on CUDA, torch otherwise)."""
    seed: int = field(default=0, metadata=flag(None))
    """Seed for requests that give none."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.device != "auto":
            torch.device(self.device)  # a bad name fails here, naming it
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        stored = checkpoint_dtype(self.model) if self.dtype == "auto" else None
        return resolve_dtype(self.dtype, self.device, stored)


def resolve_device(name: str) -> str:
    """``auto``: cuda if this node has it, else cpu; any other name as it is."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
