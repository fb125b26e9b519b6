"""Workload loaders: seeded, in range, and Mooncake prefixes shared exactly where hash ids are."""

from __future__ import annotations

import json

import pytest

from bench.serve.datasets import mooncake_requests, random_requests, sharegpt_requests
from tests.bench.conftest import write_trace


def test_random_lengths_tokens_and_seed():
    reqs = random_requests(200, 100, 20, range_ratio=0.5, vocab_size=64, seed=3)
    assert len(reqs) == 200
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert all(len(r.prompt) == r.prompt_len and max(r.prompt) < 64 for r in reqs)
    lens = [r.prompt_len for r in reqs]
    assert min(lens) < 60 and max(lens) > 140  # the whole range is used
    assert reqs == random_requests(200, 100, 20, range_ratio=0.5, vocab_size=64, seed=3)
    assert reqs != random_requests(200, 100, 20, range_ratio=0.5, vocab_size=64, seed=4)
    fixed = random_requests(5, 7, 3, seed=0)
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in fixed] == [(7, 3, None)] * 5
    assert len({tuple(r.prompt[:4]) for r in reqs}) == 200  # no accidental shared prefixes


def test_random_rejects_bad_ratio():
    with pytest.raises(ValueError, match="range-ratio"):
        random_requests(1, 10, 10, range_ratio=1.0)


def test_sharegpt(tmp_path):
    def conv(human: str, gpt: str) -> dict:
        return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}

    data = [
        conv("a b c d e", "1 2 3 4 5 6"),
        conv("too short", "1 2 3 4"),  # prompt < 4 tokens: skipped
        {"conversations": [{"from": "human", "value": "one turn only"}]},
        conv("w x y z", "r s t u v"),
        conv("p " * 30, "q " * 10),  # over max_prompt_len below: skipped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(path, 2, str.split, seed=0, max_prompt_len=20)
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in reqs) == [
        ("a b c d e", 5, 6),
        ("w x y z", 4, 5),
    ]
    assert all(r.output_len == 9 for r in sharegpt_requests(path, 2, str.split, output_len=9))
    with pytest.raises(ValueError, match="only 2 usable"):
        sharegpt_requests(path, 3, str.split, max_prompt_len=20)


def test_mooncake_shared_blocks_lengths_and_timestamps(tmp_path):
    rows = [
        {"timestamp": 1000, "input_length": 1400, "output_length": 160, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 1300, "output_length": 16, "hash_ids": [0, 1, 3]},
        {"timestamp": 2500, "input_length": 100, "output_length": 1, "hash_ids": [4]},
        {"timestamp": 2500, "input_length": 600, "output_length": 8, "hash_ids": [2]},
    ]
    path = write_trace(tmp_path / "t.jsonl", rows)
    reqs = mooncake_requests(path, vocab_size=512, seed=1, speedup=2.0, length_scale=1 / 16)
    a, b, c, d = reqs  # 512 / 16 = 32-token blocks
    assert [r.prompt_len for r in reqs] == [88, 81, 6, 38]  # round(n / 16)
    assert [len(r.prompt) for r in reqs] == [88, 81, 6, 38]
    assert [r.output_len for r in reqs] == [10, 1, 1, 1]  # at least 1
    assert [r.arrival_s for r in reqs] == [0.0, 0.25, 0.75, 0.75]
    assert a.prompt[:64] == b.prompt[:64]  # hash ids 0, 1
    assert a.prompt[64:81] != b.prompt[64:81]  # 2 vs 3
    assert d.prompt[:24] == a.prompt[64:88]  # hash id 2 again, now first
    assert d.prompt[32:] != a.prompt[:6]  # 38 > 32: a tail of its own
    same_speed = mooncake_requests(path, vocab_size=512, seed=1, length_scale=1 / 16)
    assert [r.arrival_s for r in same_speed] == [0.0, 0.5, 1.5, 1.5]
    assert [r.prompt for r in same_speed] == [r.prompt for r in reqs]
    assert len(mooncake_requests(path, num=2)) == 2
    fits = mooncake_requests(path, length_scale=1 / 16, max_total_len=40)
    assert [r.prompt_len for r in fits] == [6, 38]  # 88 + 10 and 81 + 1 dropped
    assert mooncake_requests(path)[0].prompt_len == 1400  # unscaled: 512-token blocks


def test_mooncake_synthetic_trace_prefixes(small_trace):
    from tests.bench.conftest import synthetic_trace

    rows = synthetic_trace(20, seed=5)
    reqs = mooncake_requests(small_trace(20, seed=5), seed=0, length_scale=1 / 16)
    blocks: dict[int, list[int]] = {}
    for row, req in zip(rows, reqs, strict=True):
        for j, h in enumerate(row["hash_ids"]):
            piece = req.prompt[32 * j : 32 * (j + 1)]
            if len(piece) == 32:
                assert blocks.setdefault(h, piece) == piece
