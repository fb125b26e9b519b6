"""bench.compare's markdown report and plots (goodput, P99 TTFT, P99 TPOT vs rate; CDFs)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import numpy as np

from bench.serve.metrics import is_good
from bench.serve.report import _pyplot, plot_cdfs

AGG, DIS, SERIAL = "aggregated", "disaggregated", "disaggregated-serial"
HOPS = ("reserve", "prefill_queue", "prefill_compute", "transfer_tail", "decode_admission")
SENSITIVITY = [(t, p) for t in (2, 4, 8) for p in (2, 3, 5)]
"""(TTFT, TPOT) SLO multiples of the low-load medians for the sensitivity table."""

_PANELS = [
    ("request_goodput", "goodput (req/s)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("p99_tpot_ms", "P99 TPOT (ms)"),
]


def _p99_ms(runs: list[dict], attr: str) -> float:
    values = [getattr(x, attr) for r in runs for x in r["records"] if x.success]
    values = [v for v in values if v is not None]
    return float(np.percentile(values, 99) * 1e3) if values else float("nan")


def _best_goodput(runs: list[dict], slos: dict[str, float]) -> float:
    return max(sum(is_good(x, slos) for x in r["records"]) / r["summary"]["duration_s"] for r in runs)  # fmt: skip


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def analyse(runs: dict[str, list[dict]], calib: dict) -> dict:
    """The figures of the JSON line: ratios, per-rate rows, SLO sensitivity, overhead."""
    slos = calib["slo_ms"]
    best = {n: _best_goodput(rs, slos) for n, rs in runs.items()}
    tpot = {n: _p99_ms(rs, "tpot") for n, rs in runs.items()}
    ttft = {n: _p99_ms(rs, "ttft") for n, rs in runs.items()}
    keys = ("request_goodput", "p99_ttft_ms", "p99_tpot_ms", "median_tpot_ms", "failed")
    base = {m: max(calib[AGG][f"median_{m}_ms"], calib[DIS][f"median_{m}_ms"]) for m in ("ttft", "tpot")}  # fmt: skip
    sensitivity = []
    for tx, px in SENSITIVITY:
        s = {"ttft": tx * base["ttft"], "tpot": px * base["tpot"]}
        sensitivity.append({"ttft_x": tx, "tpot_x": px, "goodput_ratio": _ratio(_best_goodput(runs[DIS], s), _best_goodput(runs[AGG], s))})  # fmt: skip
    at_2x = next(x["goodput_ratio"] for x in sensitivity if (x["ttft_x"], x["tpot_x"]) == (2, 3))
    return {
        "goodput_ratio": _ratio(best[DIS], best[AGG]),
        "goodput_ratio_ttft_2x": at_2x,
        "p99_tpot_ratio": _ratio(tpot[DIS], tpot[AGG]),
        "best_goodput": best,
        "p99_tpot_ms": tpot,
        "p99_ttft_ms": ttft,
        "slo_ms": slos,
        "ttft_overhead_ms_per_kv_mb": calib["ttft_overhead_ms_per_kv_mb"],
        "ttft_overhead_ms": calib.get("ttft_overhead_ms"),
        "overhead_goal_ms": calib.get("overhead_goal_ms"),
        "hops_ms": {n: calib[n].get("hops_ms") for n in (DIS, SERIAL) if n in calib},
        "inverse_bandwidth_ms_per_mb": calib["inverse_bandwidth_ms_per_mb"],
        "sweep": {
            n: [{"rate": r["rate"], **{k: r["summary"][k] for k in keys}} for r in rs]
            for n, rs in runs.items()
        },  # fmt: skip
        "slo_sensitivity": sensitivity,
        "calibration": calib,
    }


def machine() -> str:
    """CPU model, cores, memory, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = "unknown RAM"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} vCPU {cpu}, {mem}, {gpu}, {platform.system()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def plot_sweep(path: Path, runs: dict[str, list[dict]], slos: dict[str, float]) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, _PANELS, strict=True):
        for name, rs in runs.items():
            ax.plot(
                [r["rate"] for r in rs], [r["summary"][key] for r in rs], marker="o", label=name
            )
        slo = {"p99_ttft_ms": slos.get("ttft"), "p99_tpot_ms": slos.get("tpot")}.get(key)
        if slo:
            ax.axhline(slo, color="grey", linestyle="--", label="SLO")
        ax.set(xlabel="request rate (req/s)", ylabel=label, title=label)
        if key != "request_goodput":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def hop_lines(result: dict) -> list[str]:
    """The per-hop breakdown of the low-load calibration, one row per reservation design."""
    cal = result["calibration"]
    lines = [
        "Low load, mean ms per hop (pdserve_disagg_hop_seconds; reserve overlaps the prefill in",
        "overlap mode, and transfer_tail / decode_admission come after the first token):",
        "",
        "| setup | median TTFT | TTFT − (a) | " + " | ".join(HOPS) + " |",
        "|---|---|---|" + "---|" * len(HOPS),
    ]
    for name in (DIS, SERIAL):
        if name not in cal:
            continue
        hops = cal[name].get("hops_ms") or {}
        over = (result.get("ttft_overhead_ms") or {}).get(name)
        lines.append(
            f"| {name} | {cal[name]['median_ttft_ms']:.1f} | {_fmt(over)} | "
            + " | ".join(_fmt(hops.get(h), 3) for h in HOPS)
            + " |"
        )
    lines += ["", f"Goal for the TTFT overhead: ≤ {_fmt(result.get('overhead_goal_ms'))} ms "
              "(1.2 × the KV's bytes ÷ the shm bandwidth + 2 ms).", ""]  # fmt: skip
    return lines


def write_report(out_dir: Path, result: dict, runs: dict[str, list[dict]], requests) -> Path:
    """compare.md, compare_sweep.png, compare_cdf.png (the highest rate) in ``out_dir``."""
    cal, slos = result["calibration"], result["slo_ms"]
    sweep_png = plot_sweep(out_dir / "compare_sweep.png", runs, slos)
    cdf_png = plot_cdfs(out_dir / "compare_cdf.png", {n: rs[-1]["records"] for n, rs in runs.items()})  # fmt: skip
    long_out = sum(r.output_len > 32 for r in requests)
    a, d = cal[AGG], cal[DIS]
    x = cal["slo_multiples"]
    lines = [
        "# Aggregated vs disaggregated (`python -m bench.compare`)",
        "",
        f"{dt.date.today().isoformat()}; machine: {machine()}.",
        "",
        f"Workload per rate and setup: {len(requests)} seeded requests, {len(requests) - long_out} "
        f"with ~1800-token prompts and ~8-token outputs, {long_out} with ~256-token prompts and "
        "~128-token outputs; Poisson arrivals; `ignore_eos`; tiny demo Llama (fp32, CPU). "
        "(a) 2 decode workers prefilling locally; (b) 1 prefill + 1 decode worker, KV over shm.",
        "",
        f"SLOs from the calibration run (one request at a time): TTFT ≤ {slos['ttft']} ms "
        f"({x['ttft']:g} × {max(a['median_ttft_ms'], d['median_ttft_ms']):.1f}), TPOT ≤ {slos['tpot']} ms "
        f"({x['tpot']:g} × {max(a['median_tpot_ms'], d['median_tpot_ms']):.2f}): the larger median of the two setups.",
        "",
        "| rate (req/s) | setup | goodput (req/s) | P99 TTFT (ms) | P99 TPOT (ms) | median TPOT (ms) | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, rate in enumerate(result["rates"]):
        for name, rows in result["sweep"].items():
            r = rows[i]
            lines.append(
                f"| {rate:g} | {name} | {r['request_goodput']:.2f} | {r['p99_ttft_ms']:.0f} | "
                f"{r['p99_tpot_ms']:.1f} | {r['median_tpot_ms']:.2f} | {r['failed']} |"
            )
    best, tpot, ttft = result["best_goodput"], result["p99_tpot_ms"], result["p99_ttft_ms"]
    lines += [
        "",
        f"- **goodput_ratio** (best goodput over the sweep, (b) ÷ (a)): **{result['goodput_ratio']:.2f}** "
        f"({best[DIS]:.2f} ÷ {best[AGG]:.2f} req/s)",
        f"- **p99_tpot_ratio** (P99 TPOT over every sweep request, (b) ÷ (a)): "
        f"**{result['p99_tpot_ratio']:.2f}** ({tpot[DIS]:.1f} ÷ {tpot[AGG]:.1f} ms); "
        f"P99 TTFT {ttft[DIS]:.0f} vs {ttft[AGG]:.0f} ms",
        f"- low load: median TTFT {a['median_ttft_ms']:.1f} ms (a), {d['median_ttft_ms']:.1f} ms (b); "
        f"{d['kv_mb_per_request']:.3f} MB of KV moved per request in (b)",
        f"- disaggregation TTFT overhead: **{_fmt(result['ttft_overhead_ms_per_kv_mb'])} ms per KV MB**; "
        f"1 ÷ shm bandwidth ({cal['transport_gbps']:.2f} GB/s, bench.kv_transfer) = "
        f"{_fmt(result['inverse_bandwidth_ms_per_mb'], 3)} ms per MB; the router's own "
        f"first-layer-to-done timing gives {_fmt(d['router_kv_ms_per_mb'])} ms per MB "
        "(it overlaps the prefill of later layers)",
        "- goodput_ratio at other SLOs (multiples of the low-load medians): "
        + ", ".join(
            f"TTFT×{x['ttft_x']}/TPOT×{x['tpot_x']}: {x['goodput_ratio']:.2f}"
            for x in result["slo_sensitivity"]
        ),  # fmt: skip
        f"- goodput_ratio at TTFT ≤ 2× the low-load median (TPOT 3×): **{result['goodput_ratio_ttft_2x']:.2f}**",
        "",
        *hop_lines(result),
        f"- wall time {result['seconds']:.0f} s; load average (1, 5, 15 min) before "
        f"{'/'.join(map(str, result['load_average'][:3]))}, after "
        f"{'/'.join(map(str, result['load_average'][3:]))} on {os.cpu_count()} CPUs",
        "",
        f"![sweep]({sweep_png.name})",
        "",
        f"![latency CDFs at {result['rates'][-1]:g} req/s]({cdf_png.name})",
        "",
    ]
    path = out_dir / "compare.md"
    path.write_text("\n".join(lines))
    return path
