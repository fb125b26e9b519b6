"""Engine-test fixtures shared by modules that run one model many ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.llm import LLM


@pytest.fixture(scope="module")
def llama_dir(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_llm(llama_dir: Path) -> LLM:
    """One engine per module: its prefix cache and grammar cache carry between tests."""
    return LLM(llama_dir)
