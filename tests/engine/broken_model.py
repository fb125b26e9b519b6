"""A tiny checkpoint broken on purpose: one token's embedding row is NaN.

Any sequence holding that token computes NaN hidden states and so NaN logits, while every
other sequence computes exactly what the intact checkpoint does (the embedding is not tied
to the LM head), so Hugging Face on the same files is still the reference for them."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

POISON = 499
"""The token whose embedding is NaN; test prompts are drawn below it."""


def nan_token_model(src: Path, dst: Path, token: int = POISON) -> Path:
    """Copy the checkpoint at ``src`` to ``dst`` with ``token``'s embedding set to NaN."""
    if not dst.exists():
        shutil.copytree(src, dst)
        weights = load_file(dst / "model.safetensors")
        weights["model.embed_tokens.weight"][token] = float("nan")
        save_file(weights, dst / "model.safetensors")
    return dst


def clean_prompts(model_dir: Path, lengths: list[int], seed: int, max_new: int = 12) -> list[list[int]]:  # fmt: skip
    """Prompts (below ``POISON``) whose greedy continuation never reaches ``POISON``
    either, so the broken checkpoint serves them exactly as the intact one would."""
    from tests.engine.hf_reference import hf_greedy, make_prompts

    out = []
    for i, n in enumerate(lengths):
        s = seed + 1000 * i
        while POISON in hf_greedy(model_dir, [p := make_prompts([n], s, POISON)[0]], max_new)[0]:
            s += 7919
        out.append(p)
    return out
