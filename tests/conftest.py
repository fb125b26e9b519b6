"""Shared fixtures: single-threaded torch, tiny checkpoints built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ALL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
GPU_MATRIX_ON_CPU = os.environ.get("PDSERVE_GPU_MATRIX_ON_CPU") == "1"
"""Run the GPU matrix (``tests/gpu``) on CPU: checks the tests themselves on a machine
without CUDA (device ``cpu``, CUDA-only items skipped); never a substitute for a GPU run."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch) -> Path``: a deterministic tiny checkpoint, built on first use."""
    from engine.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, root / arch)
        return built[arch]

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        on_cpu = GPU_MATRIX_ON_CPU and "tests/gpu/" in item.nodeid
        if "gpu" in item.keywords and not on_cpu:
            item.add_marker(skip)
