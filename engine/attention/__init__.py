"""Attention backends, chosen by name (``torch`` reference on CPU, ``triton`` on CUDA)."""

from __future__ import annotations

import importlib

from engine.attention.backend import AttentionBackend, AttentionMetadata

_REGISTRY: dict[str, str] = {
    "torch": "engine.attention.torch_backend:TorchAttentionBackend",
    "triton": "engine.attention.triton_backend:TritonAttentionBackend",
}
_QUANT_REGISTRY: dict[str, str] = {
    "torch": "engine.attention.quant_backend:QuantTorchAttentionBackend",
    "triton": "engine.attention.quant_triton_backend:QuantTritonAttentionBackend",
}
"""Backends of a quantized KV cache (``--kv-cache-dtype`` fp8/int8), built with its name."""


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (imported lazily on first use)."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def resolve_backend_name(name: str, device: str) -> str:
    """Turn ``auto`` into a concrete backend for ``device``."""
    if name != "auto":
        return name
    if str(device).startswith("cuda") and "triton" in _REGISTRY:
        return "triton"
    return "torch"


def get_backend(name: str, device: str = "cpu", kv_cache_dtype: str = "auto") -> AttentionBackend:
    """Instantiate the backend registered under ``name`` (``auto`` picks one for ``device``),
    in its quantized-cache form when ``kv_cache_dtype`` is not ``auto``."""
    name = resolve_backend_name(name, device)
    registry = _REGISTRY if kv_cache_dtype == "auto" else _QUANT_REGISTRY
    if name not in registry:
        raise ValueError(
            f"unknown attention backend {name!r} for kv_cache_dtype={kv_cache_dtype}; "
            f"choose one of {['auto', *sorted(registry)]}"
        )
    module_name, cls_name = registry[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls() if kv_cache_dtype == "auto" else cls(kv_cache_dtype)


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
]
