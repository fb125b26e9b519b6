"""Aggregated vs disaggregated serving on this machine: one tiny model, one seeded workload.

    python -m bench.compare [--json] [--rates 2,4,6] [--num-prompts 40]
    pdserve bench compare --json

    (a) aggregated      2 decode workers that prefill locally
    (b) disaggregated   1 prefill + 1 decode worker, KV pages over shm (written in place
                        into the decode worker's shared pool); the router reserves on D
                        while P prefills (reserve_mode overlap)
    (b') disaggregated-serial  (b)'s workers behind a router of its own that reserves first
                        (reserve_mode serial): calibration only, the A/B of the two designs

Both clusters run at once as Ray actors (idle workers sleep), each worker pinned to its
own core where the OS allows (every thread, ``sched_setaffinity``, at nice 0 rather than
Ray's 15); each setup has its own router process (``pdserve serve --worker ...``) and
this process generates the load.

    calibrate   requests one at a time on each setup: low-load TTFT and TPOT. SLOs are a
                fixed multiple of the larger of the (a) and (b) medians. Disaggregation's
                TTFT overhead per KV megabyte moved is set beside 1 / the transport
                bandwidth, and the mean of every hop the routers measured
                (pdserve_disagg_hop_seconds) breaks the remote path down.
    sweep       per request rate, the same seeded prefill-heavy mix on (a) then (b), so
                both see the same background load; goodput, P99 TTFT and P99 TPOT.
    report      bench/results/compare.md with plots; the last line printed is JSON with
                goodput_ratio (best goodput of (b) over the sweep ÷ that of (a)) and
                p99_tpot_ratio (P99 TPOT over all sweep requests, (b) ÷ (a)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.compare_cluster import MODEL_NAME, Cluster, Setup, hop_means_ms, start_clusters
from bench.serve.client import ClientConfig
from bench.serve.datasets import BenchRequest, random_requests
from bench.serve.metrics import summarize
from bench.serve.runner import BenchResult, RunConfig, run

logger = logging.getLogger("bench.compare")
RESULTS = Path(__file__).resolve().parent / "results"
TTFT_SLO_X, TPOT_SLO_X = 4.0, 3.0
"""SLO = this multiple of the larger low-load median (aggregated, disaggregated)."""
CALIBRATION_SEGMENTS = 8


SETUPS = (
    Setup("aggregated", 0, 2),
    Setup("disaggregated", 1, 1),
    Setup(
        "disaggregated-serial",
        1,
        1,
        shares="disaggregated",
        router_args=("--reserve-mode", "serial"),
    ),  # fmt: skip
)
SWEPT = ("aggregated", "disaggregated")
"""The setups of the sweep (the serial router shares the disaggregated workers)."""


def prefill_heavy_mix(num: int, seed: int, vocab: int, long_output_share: float = 0.25):
    """Long prompts (~1800 tokens) with short outputs (~8), and a share of ~256-token
    prompts with long outputs (~128): prefills big enough to stall co-located decodes."""
    heavy = random_requests(num, 1800, 8, 0.1, vocab, seed)
    chatty = random_requests(num, 256, 128, 0.25, vocab, seed + 1)
    rng = random.Random(seed)
    return [c if rng.random() < long_output_share else h for h, c in zip(heavy, chatty, strict=True)]  # fmt: skip


# -- measurements --------------------------------------------------------------------------


def bench(cluster: Cluster, requests: list[BenchRequest], cfg: RunConfig) -> BenchResult:
    client = ClientConfig(cluster.url, MODEL_NAME, ignore_eos=True)
    return asyncio.run(run(client, cfg, requests))


def interleaved(clusters, requests, cfg: RunConfig, segments: int) -> dict[str, dict]:
    """Run ``requests`` on every setup in ``segments`` slices, alternating which setup goes
    first, so bursts of background load on this shared box hit both setups alike.
    Per setup: the records of every slice and a summary over their summed durations."""
    n = len(requests)
    cuts = [n * k // segments for k in range(segments + 1)]
    got: dict[str, dict] = {name: {"records": [], "duration_s": 0.0} for name in clusters}
    for k in range(segments):
        for name in sorted(clusters, reverse=bool(k % 2)):
            result = bench(clusters[name], requests[cuts[k] : cuts[k + 1]], cfg)
            got[name]["records"] += result.records
            got[name]["duration_s"] += result.summary["duration_s"]
    for g in got.values():
        g["summary"] = summarize(g["records"], g["duration_s"], cfg.goodput)
    return got


def calibrate(clusters: dict[str, Cluster], requests: list[BenchRequest], seed: int) -> dict:
    """Low load (one request at a time): medians, SLOs, KV moved per request, hop means."""
    cfg = RunConfig(max_concurrency=1, seed=seed, warmup=2, progress=False)
    before = {name: c.counters() for name, c in clusters.items()}
    got = interleaved(clusters, requests, cfg, segments=CALIBRATION_SEGMENTS)
    out: dict = {}
    for name, c in clusters.items():
        s, after = got[name]["summary"], c.counters()
        kv_bytes = after["kv_bytes"] - before[name]["kv_bytes"]
        kv_s = after["kv_seconds"] - before[name]["kv_seconds"]
        n = s["completed"] + cfg.warmup * CALIBRATION_SEGMENTS  # warmups moved KV too
        out[name] = {"median_ttft_ms": s["median_ttft_ms"], "median_tpot_ms": s["median_tpot_ms"],
                     "kv_mb_per_request": kv_bytes / 1e6 / n,
                     "router_kv_ms_per_mb": 1e3 * kv_s / (kv_bytes / 1e6) if kv_bytes else None,
                     "hops_ms": hop_means_ms(before[name], after)}  # fmt: skip
    a, d = out["aggregated"], out["disaggregated"]
    out["slo_multiples"] = {"ttft": TTFT_SLO_X, "tpot": TPOT_SLO_X}
    out["slo_ms"] = {
        "ttft": round(TTFT_SLO_X * max(a["median_ttft_ms"], d["median_ttft_ms"]), 1),
        "tpot": round(TPOT_SLO_X * max(a["median_tpot_ms"], d["median_tpot_ms"]), 2),
    }
    mb = d["kv_mb_per_request"]
    out["ttft_overhead_ms"] = {n: out[n]["median_ttft_ms"] - a["median_ttft_ms"] for n in out if n.startswith("disaggregated")}  # fmt: skip
    out["ttft_overhead_ms_per_kv_mb"] = out["ttft_overhead_ms"]["disaggregated"] / mb if mb else None  # fmt: skip
    return out


def sweep(clusters, workload, rates, slos, seed, segments) -> dict[str, list[dict]]:
    """Per rate, fresh prompts (no prefix cache hits from an earlier rate) on both setups."""
    runs: dict[str, list[dict]] = {name: [] for name in clusters}
    for i, rate in enumerate(rates):
        cfg = RunConfig(request_rate=rate, seed=seed + i, goodput=slos, progress=False)
        for name, g in interleaved(clusters, workload(i), cfg, segments).items():
            s = g["summary"]
            logger.info("%-13s %5.2f req/s: goodput %.2f, P99 TTFT %.0f ms, P99 TPOT %.1f ms, failed %d",
                        name, rate, s["request_goodput"], s["p99_ttft_ms"], s["p99_tpot_ms"], s["failed"])  # fmt: skip
            runs[name].append({"rate": rate, **g})
    return runs


def transport_gbps(runs: int = 3) -> float:
    """Bulk shm bandwidth (the transport the disaggregated setup uses), bench.kv_transfer."""
    import statistics

    from bench import kv_transfer

    b = kv_transfer.Bench(runs)
    try:
        kv, _ = b.runs_of("shm")
    finally:
        b.close()
    return statistics.median(kv_transfer.gbps(t) for t in kv)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print only the JSON line (and logs)")
    p.add_argument("--rates", default="4,6,8,10,12", help="request rates to sweep (req/s)")
    p.add_argument("--num-prompts", type=int, default=120, help="requests per rate and setup")
    p.add_argument("--calibration-prompts", type=int, default=32)
    p.add_argument("--segments", type=int, default=4, help="alternating slices per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="report directory")


def cmd(args: argparse.Namespace) -> int:
    from bench.compare_report import analyse, write_report
    from engine.tiny_model import ensure_demo_model
    from engine.tokenizer import Tokenizer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rates = [float(r) for r in args.rates.split(",")]
    model = str(ensure_demo_model())
    vocab = Tokenizer.from_dir(model).vocab_size
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, load_before = time.monotonic(), os.getloadavg()
    logger.info("measuring the shm transport's bandwidth (bench.kv_transfer)")
    gbps = transport_gbps()
    clusters, workers = start_clusters(SETUPS, model, Path(tempfile.mkdtemp(prefix="pdserve-compare-")))  # fmt: skip
    try:
        calib = calibrate(clusters, prefill_heavy_mix(args.calibration_prompts, args.seed + 100, vocab), args.seed)  # fmt: skip
        calib["transport_gbps"] = gbps
        calib["inverse_bandwidth_ms_per_mb"] = 1.0 / gbps
        mb = calib["disaggregated"]["kv_mb_per_request"]
        calib["overhead_goal_ms"] = 1.2 * mb / gbps + 2.0  # issue 19: 1.2 x bytes/bandwidth + 2 ms
        logger.info("calibration: %s", json.dumps(calib))

        def workload(i: int) -> list[BenchRequest]:
            return prefill_heavy_mix(args.num_prompts, args.seed + 1000 * (i + 1), vocab)

        swept = {n: clusters[n] for n in SWEPT}
        runs = sweep(swept, workload, rates, calib["slo_ms"], args.seed, args.segments)
        requests = workload(0)
    finally:
        for c in clusters.values():
            c.stop()
        workers.shutdown(disconnect=True)
    result = {**analyse(runs, calib), "rates": rates, "num_prompts": args.num_prompts,
              "seconds": round(time.monotonic() - start, 1),
              "load_average": [round(x, 1) for x in (*load_before, *os.getloadavg())]}  # fmt: skip
    report = write_report(out_dir, result, runs, requests)
    if not args.json:
        print(report.read_text())
    logger.info("wrote %s", report)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])  # fmt: skip
    add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    return cmd(args)


if __name__ == "__main__":
    sys.exit(main())
