"""Per-request timing and the run summary, with the definitions of ``vllm bench serve``.

One streamed request is a timeline of SSE ``data:`` messages, each stamped on arrival::

    send ──────── chunk ──── chunk ──── chunk ──── usage ── [DONE]
    start         t1         t2         t3
    |<── TTFT ──>|<─ ITL ─>|<─ ITL ─>|
    |<────────────── E2EL ──────────>|

- A *token chunk* is a message with a non-empty ``choices`` list. It counts even when its
  text is empty (a token that does not detokenize to visible text yet), as vLLM counts it.
  Usage-only messages (``"choices": []``) and SSE comments are not token chunks.
- TTFT = first token chunk − send. E2EL = last token chunk − send.
- ITL = the gaps between consecutive token chunks (one per chunk, not per token).
- Output tokens = ``usage.completion_tokens`` when the server reports it, else the number
  of token chunks.
- TPOT = (E2EL − TTFT) / (output tokens − 1), only for outputs of more than one token; for
  goodput a single-token output has TPOT 0 (vLLM does the same).
- Goodput = requests per second that meet every SLO given (``value <= SLO``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)


@dataclass
class RequestRecord:
    """One request's outcome; times in seconds (``start`` is relative to the run start)."""

    index: int
    prompt_len: int
    """Prompt tokens sent (the dataset's count, else the server's ``usage.prompt_tokens``)."""
    expected_output_len: int
    start: float = 0.0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    """E2EL: send to the last token chunk."""
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens`` when the server reports it."""
    server_prompt_tokens: int | None = None
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """(E2EL − TTFT) / (output tokens − 1); ``None`` for failed or 1-token outputs."""
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def slo_values(self) -> dict[str, float]:
        """The values goodput checks against the SLOs (TPOT 0 for single-token outputs)."""
        return {"ttft": self.ttft, "tpot": self.tpot or 0.0, "e2el": self.latency}


def chunk_text(data: dict[str, Any]) -> str | None:
    """The text of a token chunk (``""`` when empty), ``None`` when it is no token chunk."""
    choices = data.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def record_from_events(
    record: RequestRecord, send: float, events: list[tuple[float, dict[str, Any]]]
) -> RequestRecord:
    """Fill ``record`` from the SSE messages of one stream, stamped with arrival times.

    ``events`` holds every ``data:`` message but ``[DONE]``, in arrival order.
    """
    times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    for t, data in events:
        if "error" in data and not data.get("choices"):
            record.error = str((data["error"] or {}).get("message", data["error"]))
            record.success = False
            return record
        text = chunk_text(data)
        if text is not None:
            times.append(t)
            texts.append(text)
        if data.get("usage"):
            usage = data["usage"]
    if not times:
        record.error = "the stream carried no token chunk"
        record.success = False
        return record
    record.success = True
    record.ttft = times[0] - send
    record.latency = times[-1] - send
    record.itl = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    record.generated_text = "".join(texts)
    record.output_tokens = len(times)
    if usage is not None:
        record.output_tokens = int(usage.get("completion_tokens") or len(times))
        record.server_prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            record.cached_tokens = int(details["cached_tokens"])
        if not record.prompt_len and record.server_prompt_tokens:
            record.prompt_len = int(record.server_prompt_tokens)
    return record


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"bad --goodput item {item!r}: use NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)} (e.g. ttft:500 tpot:50)"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(
                f"bad --goodput value {value!r} for {name}: need a number of ms"
            ) from None
        if ms < 0:
            raise ValueError(f"--goodput {name}:{value} must be >= 0 ms")
        slos[name] = ms
    return slos


def is_good(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A successful request whose every SLO metric is at most its SLO."""
    if not record.success:
        return False
    values = record.slo_values()
    return all(values[name] * 1000.0 <= ms for name, ms in slos_ms.items())


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(
    records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's figures (vLLM names); latency stats over successful requests only."""
    ok = [r for r in records if r.success]
    duration_s = max(duration_s, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if slos_ms:
        good = sum(is_good(r, slos_ms) for r in records)
        out["good_requests"] = good
        out["request_goodput"] = good / duration_s
    for name in LATENCY_METRICS:
        out.update(_stats(name, series[name]))
    out["prefix_cache_hit_rate"] = prefix_cache_hit_rate(ok)
    return out


def prefix_cache_hit_rate(records: list[RequestRecord]) -> float | None:
    """Cached prompt tokens ÷ prompt tokens, over requests whose server reported both."""
    pairs = [
        (r.cached_tokens, r.server_prompt_tokens)
        for r in records
        if r.cached_tokens is not None and r.server_prompt_tokens
    ]
    if not pairs:
        return None
    return sum(c for c, _ in pairs) / sum(p for _, p in pairs)
