"""Show a run: the summary table (vllm bench serve's layout), the JSON file, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.serve.metrics import PERCENTILES, RequestRecord
from bench.serve.runner import BenchResult

_SECTIONS = [
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
]


def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40} {value!s:<10}".rstrip()


def format_table(result: BenchResult) -> str:
    s, cfg = result.summary, result.config
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        _line("Successful requests:", s["completed"]),
        _line("Failed requests:", s["failed"]),
        _line("Request rate (req/s):", cfg.get("request_rate")),
        _line("Maximum request concurrency:", cfg.get("max_concurrency")),
        _line("Benchmark duration (s):", s["duration_s"]),
        _line("Total input tokens:", s["total_input_tokens"]),
        _line("Total generated tokens:", s["total_output_tokens"]),
        _line("Request throughput (req/s):", s["request_throughput"]),
    ]
    if "request_goodput" in s:
        slos = " ".join(f"{k}:{v:g}" for k, v in cfg.get("goodput", {}).items())
        lines.append(_line("Goodput SLOs (ms):", slos))
        lines.append(_line("Request goodput (req/s):", s["request_goodput"]))
    lines += [
        _line("Output token throughput (tok/s):", s["output_throughput"]),
        _line("Total token throughput (tok/s):", s["total_token_throughput"]),
    ]
    if s.get("prefix_cache_hit_rate") is not None:
        lines.append(_line("Prefix cache hit rate (%):", 100.0 * s["prefix_cache_hit_rate"]))
    for key, short, title in _SECTIONS:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        lines.append(_line(f"Mean {short} (ms):", s[f"mean_{key}_ms"]))
        lines.append(_line(f"Median {short} (ms):", s[f"median_{key}_ms"]))
        for p in PERCENTILES:
            lines.append(_line(f"P{p} {short} (ms):", s[f"p{p}_{key}_ms"]))
    lines.append("=" * 50)
    errors = sorted({r.error for r in result.records if r.error})
    lines += [f"error: {e}" for e in errors[:5]]
    return "\n".join(lines)


def write_json(path: str | Path, result: BenchResult) -> Path:
    """Every per-request record, the summary and the run's settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'pdserve[bench]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft * 1e3 for r in ok],
        "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None],
        "itl": [g * 1e3 for r in ok for g in r.itl],
        "e2el": [r.latency * 1e3 for r in ok],
    }


def plot_cdfs(path: Path, runs: dict[str, list[RequestRecord]]) -> Path:
    """One CDF panel per latency metric, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, short, _) in zip(axes.flat, _SECTIONS, strict=True):
        for label, records in runs.items():
            values = sorted(_series(records)[key])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=label)
        ax.set(xlabel=f"{short} (ms)", ylabel="fraction of requests", title=f"{short} CDF")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_over_time(path: Path, metric: str, runs: dict[str, list[RequestRecord]]) -> Path:
    """Per-request TTFT or TPOT (ms) against the time it was sent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, records in runs.items():
        pts = [(r.start, getattr(r, metric)) for r in records if r.success]
        pts = [(t, v * 1e3) for t, v in pts if v is not None]
        ax.scatter([t for t, _ in pts], [v for _, v in pts], s=8, label=label)
    ax.set(xlabel="request sent at (s)", ylabel=f"{metric.upper()} (ms)", title=f"{metric.upper()} over time")  # fmt: skip
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(out_dir: str | Path, runs: dict[str, list[RequestRecord]]) -> list[Path]:
    """latency_cdf.png, ttft_over_time.png, tpot_over_time.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_cdfs(out / "latency_cdf.png", runs),
        plot_over_time(out / "ttft_over_time.png", "ttft", runs),
        plot_over_time(out / "tpot_over_time.png", "tpot", runs),
    ]
