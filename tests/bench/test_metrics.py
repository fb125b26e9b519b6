"""Metric definitions on synthetic timelines (send at t=10 s; dyadic times, exact values)."""

from __future__ import annotations

import pytest

from bench.serve.metrics import (
    RequestRecord,
    is_good,
    parse_goodput,
    record_from_events,
    summarize,
)

SEND = 10.0


def text(t: float, s: str, finish: str | None = None) -> tuple[float, dict]:
    return t, {"choices": [{"index": 0, "text": s, "finish_reason": finish}], "usage": None}


def delta(t: float, content: str | None, role: str | None = None) -> tuple[float, dict]:
    d = {"content": content} if role is None else {"role": role, "content": content}
    return t, {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}


def usage(t: float, completion: int, prompt: int = 8, cached: int | None = 0) -> tuple[float, dict]:
    u = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return t, {"choices": [], "usage": u}


def run(events, prompt_len: int = 8) -> RequestRecord:
    return record_from_events(RequestRecord(0, prompt_len, 4), SEND, events)


def test_completion_stream():
    r = run([text(10.5, "a"), text(10.75, "b"), text(11.0, "c"), text(11.25, "d", "length"),
             usage(11.3, 4, cached=4)])  # fmt: skip
    assert r.success and r.error == ""
    assert r.ttft == 0.5
    assert r.itl == [0.25, 0.25, 0.25]
    assert r.latency == 1.25  # the last token chunk, not the usage message
    assert r.output_tokens == 4
    assert r.tpot == 0.25  # (1.25 - 0.5) / 3
    assert r.generated_text == "abcd"
    assert (r.cached_tokens, r.server_prompt_tokens) == (4, 8)


def test_empty_first_chunk_counts_as_the_first_token():
    r = run([text(10.25, ""), text(10.5, "x"), text(10.75, "y"), usage(10.75, 3)])
    assert r.ttft == 0.25
    assert r.itl == [0.25, 0.25]
    assert r.latency == 0.75
    assert r.tpot == 0.25
    assert r.generated_text == "xy"


def test_chat_stream_role_chunk_and_usage_only_message():
    r = run([delta(10.5, "", role="assistant"), delta(11.0, "hi"), delta(11.5, None),
             usage(11.5, 3)])  # fmt: skip
    assert (r.ttft, r.latency, r.itl) == (0.5, 1.5, [0.5, 0.5])
    assert r.tpot == 0.5
    assert r.generated_text == "hi"


def test_single_token_output():
    r = run([text(10.5, "a", "length"), usage(10.5, 1)])
    assert r.success and r.ttft == r.latency == 0.5
    assert r.itl == [] and r.output_tokens == 1
    assert r.tpot is None  # no TPOT for a 1-token output ...
    assert r.slo_values() == {"ttft": 0.5, "tpot": 0.0, "e2el": 0.5}  # ... 0 for goodput


def test_without_usage_counts_chunks():
    r = run([text(10.5, "a"), text(11.0, "b"), text(11.5, "c")])
    assert r.output_tokens == 3 and r.tpot == 0.5
    assert r.cached_tokens is None and r.server_prompt_tokens is None


def test_usage_counts_tokens_of_multi_token_chunks():
    r = run([text(10.5, "ab"), text(11.5, "cde"), usage(11.5, 5)])
    assert r.output_tokens == 5
    assert r.itl == [1.0]
    assert r.tpot == 0.25  # (1.5 - 0.5) / 4


def test_server_prompt_tokens_fill_an_unknown_prompt_len():
    r = run([text(10.5, "a"), usage(10.5, 1, prompt=37)], prompt_len=0)
    assert r.prompt_len == 37


def test_failures():
    r = run([text(10.5, "a"), (10.75, {"error": {"message": "boom", "type": "server_error"}})])
    assert not r.success and r.error == "boom"
    r = run([usage(10.5, 0)])
    assert not r.success and "no token chunk" in r.error


def rec(i, ttft, latency, out, success=True, prompt=100, cached=None, itl=()):
    return RequestRecord(
        i, prompt, out, success=success, ttft=ttft, latency=latency, output_tokens=out,
        itl=list(itl), cached_tokens=cached, server_prompt_tokens=prompt if cached is not None else None,
    )  # fmt: skip


def test_summary_exact():
    records = [
        rec(0, 0.25, 1.25, 5, cached=50, itl=[0.25] * 4),  # tpot 0.25
        rec(1, 0.5, 0.5, 1, cached=0),  # single token: no tpot
        rec(2, 1.0, 2.0, 3, cached=0, itl=[0.5, 0.5]),  # tpot 0.5
        rec(3, 9.0, 9.0, 0, success=False),
    ]
    s = summarize(records, duration_s=2.0, slos_ms={"ttft": 500, "tpot": 250})
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 300 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == 1.5
    assert s["output_throughput"] == 4.5
    assert s["total_token_throughput"] == 154.5
    # ttft ms [250, 500, 1000]: linear interpolation at ranks 1.8 and 1.98
    assert s["mean_ttft_ms"] == pytest.approx(1750 / 3)
    assert s["median_ttft_ms"] == 500
    assert s["p90_ttft_ms"] == pytest.approx(900)
    assert s["p99_ttft_ms"] == pytest.approx(990)
    # tpot ms [250, 500] (the 1-token output has none)
    assert s["mean_tpot_ms"] == 375 and s["median_tpot_ms"] == 375
    assert s["std_tpot_ms"] == 125
    assert s["p99_tpot_ms"] == pytest.approx(497.5)
    # itl: every gap of every successful request
    assert s["mean_itl_ms"] == pytest.approx(1000 * 2.0 / 6)
    assert s["median_e2el_ms"] == 1250
    # good: #0 (250 <= 500, 250 <= 250) and #1 (500 <= 500, tpot 0); #2 misses both
    assert s["good_requests"] == 2 and s["request_goodput"] == 1.0
    assert s["prefix_cache_hit_rate"] == pytest.approx(50 / 300)


def test_goodput_slo_subsets_and_failures():
    ok = rec(0, 0.25, 1.25, 5)
    assert is_good(ok, {"e2el": 1250}) and not is_good(ok, {"e2el": 1249})
    assert is_good(ok, {}) and not is_good(rec(1, 0.1, 0.1, 1, success=False), {})


def test_summary_of_nothing_is_zero():
    s = summarize([rec(0, 0, 0, 0, success=False)], duration_s=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0 and s["p99_tpot_ms"] == 0.0
    assert "request_goodput" not in s and s["prefix_cache_hit_rate"] is None


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.5,
    }  # fmt: skip
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)
