"""Kernel tests: on CUDA they run compiled; without CUDA, under the Triton interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated (and again by a few lazy imports
inside triton at launch), so without CUDA it is set while the kernel modules are first
imported and, through an autouse fixture, during each test of this folder only. It is
restored in between: other test folders, and subprocesses they start, never see it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_KERNEL_MODULES = (
    "engine.kernels.store_kv",
    "engine.kernels.paged_decode_attention",
    "engine.kernels.paged_prefill_attention",
    "engine.attention.triton_backend",
    "engine.kernels.dequant_kv",
    "engine.attention.quant_triton_backend",
    "engine.kernels.w8a16_gemm",
)


def _import_kernels_interpreted() -> None:
    if "engine.kernels.store_kv" in sys.modules:  # another folder's tests imported it first
        from engine.kernels._launch import is_interpreted
        from engine.kernels.store_kv import _store_kv_kernel

        if not is_interpreted(_store_kv_kernel):
            raise RuntimeError(
                "engine.kernels was imported before tests/kernels/conftest.py could enable "
                "TRITON_INTERPRET; run tests/kernels in its own pytest process"
            )
    # Every module not imported yet is decorated now, interpreted (the early ones were).
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in _KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not torch.cuda.is_available():
    _import_kernels_interpreted()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
