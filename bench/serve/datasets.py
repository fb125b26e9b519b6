"""Workloads: seeded random token prompts, ShareGPT conversations, Mooncake trace replay.

Every loader returns a list of :class:`BenchRequest` and is deterministic for a seed.

Mooncake traces (``kvcache-ai/Mooncake``, ``FAST25-release/traces``) are JSONL lines
``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``. Each hash
id stands for one 512-token block; equal ids in two requests mean the same block at the
same position of a shared prefix. Replay gives every hash id one fixed random token
block, so equal ids become identical token sequences and a server's prefix cache can hit::

    hash_ids   [ 7 ][ 8 ][ 9 ]          -> prompt = block(7) + block(8) + block(9)[:rest]
    hash_ids   [ 7 ][ 8 ][ 42 ][ 43 ]   -> shares block(7) + block(8) with the one above

``length_scale`` shrinks every length and the block size alike (0.0625 turns 512-token
blocks into 32-token ones), and ``speedup`` divides the gaps between timestamps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str
    """Token ids, or text (ShareGPT)."""
    prompt_len: int
    output_len: int
    arrival_s: float | None = None
    """Send time after the run's start (trace replay); ``None`` = the request-rate schedule."""


def _check_ratio(range_ratio: float) -> None:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    vocab_size: int = 512,
    seed: int = 0,
) -> list[BenchRequest]:
    """Lengths uniform in ``[len * (1 - r), len * (1 + r)]`` (as vLLM's random dataset).

    Prompt tokens are drawn independently (not vLLM's consecutive ids, which make two
    prompts share a prefix by accident), so prompts share no prefix.
    """
    _check_ratio(range_ratio)
    if input_len < 1 or output_len < 1:
        raise ValueError(f"random lengths must be >= 1, got input {input_len}, output {output_len}")
    rng = np.random.default_rng(seed)
    in_lo, in_hi = max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio))
    out_lo, out_hi = (
        max(1, int(output_len * (1 - range_ratio))),
        int(output_len * (1 + range_ratio)),
    )
    in_lens = rng.integers(in_lo, max(in_lo, in_hi) + 1, size=num)
    out_lens = rng.integers(out_lo, max(out_lo, out_hi) + 1, size=num)
    return [
        BenchRequest(rng.integers(0, vocab_size, size=int(n)).tolist(), int(n), int(m))
        for n, m in zip(in_lens, out_lens, strict=True)
    ]


def sharegpt_requests(
    path: str | Path,
    num: int,
    encode: Callable[[str], list[int]],
    seed: int = 0,
    output_len: int | None = None,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """The first human turn as prompt, the reply's token count as output length.

    Conversations are shuffled with ``seed``; pairs shorter than 4 tokens or longer than
    the limits are skipped (vLLM's filter). ``output_len`` overrides the reply's length.
    """
    data = json.loads(Path(path).read_text())
    convs = [c["conversations"] for c in data if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out: list[BenchRequest] = []
    for conv in convs:
        if len(out) == num:
            break
        prompt, reply = conv[0]["value"], conv[1]["value"]
        n = len(encode(prompt))
        m = output_len or len(encode(reply))
        if n < 4 or m < 4 or n > max_prompt_len or n + m > max_total_len:
            continue
        out.append(BenchRequest(prompt, n, m))
    if len(out) < num:
        raise ValueError(f"{path} has only {len(out)} usable conversations; asked for {num}")
    return out


def read_trace(path: str | Path, num: int | None = None) -> list[dict]:
    """The first ``num`` rows of a Mooncake JSONL trace (all when ``None``)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if num is not None and len(rows) == num:
                    break
    if not rows:
        raise ValueError(f"no requests in trace {path}")
    return rows


def _scaled(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def mooncake_requests(
    path: str | Path,
    num: int | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    speedup: float = 1.0,
    length_scale: float = 1.0,
    max_total_len: int | None = None,
) -> list[BenchRequest]:
    """Replay a Mooncake trace: shared hash ids -> shared token blocks (module docstring).

    Rows whose scaled input + output exceed ``max_total_len`` are dropped (their time
    slot stays empty), so a trace fits a model's context.
    """
    if speedup <= 0 or length_scale <= 0:
        raise ValueError(f"--trace-speedup and --length-scale must be > 0, got {speedup}, {length_scale}")  # fmt: skip
    rows = read_trace(path, num)
    block = _scaled(TRACE_BLOCK_TOKENS, length_scale)
    blocks: dict[int, list[int]] = {}

    def tokens_of(hash_id: int) -> list[int]:
        if hash_id not in blocks:
            rng = np.random.default_rng([seed, 1, hash_id])
            blocks[hash_id] = rng.integers(0, vocab_size, size=block).tolist()
        return blocks[hash_id]

    t0 = min(row["timestamp"] for row in rows)
    out = []
    for i, row in enumerate(rows):
        ids = row.get("hash_ids") or []
        n = _scaled(row["input_length"], length_scale)
        m = _scaled(row["output_length"], length_scale)
        if max_total_len is not None and n + m > max_total_len:
            continue
        prompt = [t for h in ids for t in tokens_of(h)][:n]
        if len(prompt) < n:  # more tokens than blocks: a tail unique to this request
            rng = np.random.default_rng([seed, 2, i])
            prompt += rng.integers(0, vocab_size, size=n - len(prompt)).tolist()
        arrival = (row["timestamp"] - t0) / 1000.0 / speedup
        out.append(BenchRequest(prompt, n, m, arrival))
    return out
