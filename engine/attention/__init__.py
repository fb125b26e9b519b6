"""Attention backends, chosen by name (``torch`` reference on CPU, ``triton`` on CUDA)."""

from __future__ import annotations

import importlib

from engine.attention.backend import AttentionBackend, AttentionMetadata

_REGISTRY: dict[str, str] = {
    "torch": "engine.attention.torch_backend:TorchAttentionBackend",
    "triton": "engine.attention.triton_backend:TritonAttentionBackend",
}


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


def get_backend(name: str, device: str = "cpu") -> AttentionBackend:
    """Instantiate the backend registered under ``name`` (``auto`` picks one for ``device``)."""
    name = resolve_backend_name(name, device)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {['auto', *available_backends()]}"
        )
    module_name, cls_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
]
