"""The GPU matrix: the engine, serving, KV transfer and EP on CUDA (``make test-gpu``).

Every test here is marked ``gpu`` and skipped without CUDA. ``PDSERVE_GPU_MATRIX_ON_CPU=1``
runs them on CPU instead (``DEVICE`` = ``cpu``; items that only mean something on CUDA,
such as the compiled Triton kernels, still skip): a check of the tests, not of CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import GPU_MATRIX_ON_CPU

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA or not GPU_MATRIX_ON_CPU else "cpu"

needs_two_devices = pytest.mark.skipif(
    ON_CUDA and torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices (NCCL between two ranks of one machine)",
)
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="compiled Triton kernels need CUDA")


def device(rank: int = 0) -> str:
    """The device of rank ``rank`` (``cuda:<rank>`` on CUDA)."""
    return f"cuda:{rank}" if DEVICE == "cuda" else "cpu"
