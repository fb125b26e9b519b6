"""Small Mooncake-format traces, written by the tests themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


def write_trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_trace(num: int, seed: int = 0, gap_ms: int = 40) -> list[dict]:
    """``num`` requests in the Mooncake format; about half extend an earlier prompt."""
    rng = random.Random(seed)
    rows: list[dict] = []
    next_id, t = 0, 0
    for _ in range(num):
        shared = rng.choice(rows)["hash_ids"][: rng.randint(1, 2)] if rows and rng.random() < 0.5 else []  # fmt: skip
        fresh = list(range(next_id, next_id + rng.randint(1, 3)))
        next_id += len(fresh)
        ids = shared + fresh
        n = 512 * (len(ids) - 1) + rng.randint(1, 512)
        rows.append({"timestamp": t, "input_length": n, "output_length": rng.randint(4, 64), "hash_ids": ids})  # fmt: skip
        t += rng.randint(0, 2 * gap_ms)
    return rows


@pytest.fixture
def small_trace(tmp_path):
    """``small_trace(num, seed=0) -> Path`` of a synthetic Mooncake-format JSONL trace."""

    def make(num: int, seed: int = 0) -> Path:
        return write_trace(tmp_path / f"trace-{num}-{seed}.jsonl", synthetic_trace(num, seed))

    return make
