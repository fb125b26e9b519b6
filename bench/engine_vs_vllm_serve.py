"""The serving view of ``bench.engine_vs_vllm``: the same request stream through HTTP.

``pdserve serve --prefill 0`` (aggregated: one decode worker that prefills locally) and
vLLM's OpenAI server start in turn on the same checkpoint and dtype, with the same
thread count and batch limits; ``pdserve bench serve`` (``bench/serve``) drives each with
the same seeded random token-id stream (``ignore_eos``) and the TTFT / TPOT / throughput
figures are set side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("bench.engine_vs_vllm")
ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "bench-model"
KEPT = (
    "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "completed", "failed",
)  # fmt: skip


def free_port() -> int:
    # Neither server reports a port it chose itself, so this benchmark picks one (tests
    # never do this; a lost race here fails the run loudly at start-up).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(engine: str, model: Path, dtype: str, port: int, args) -> tuple[list, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    limits = ["--max-num-seqs", "128", "--max-num-batched-tokens", "2048"]
    if engine == "pdserve":
        kv = str(int(args.kv_gib * 2**30) // _block_bytes(model, dtype))
        cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "WARNING", "serve",
               "--model", str(model), "--served-model-name", MODEL_NAME, "--prefill", "0",
               "--port", str(port), "--dtype", dtype, "--num-kv-blocks", kv, *limits]  # fmt: skip
        return cmd, env
    cores = os.cpu_count() or 1
    first = max(0, cores - args.threads)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{cores - 1}" if args.threads > 1 else str(first)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(args.kv_gib)))
    cmd = [args.peer_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--disable-log-stats", *limits]  # fmt: skip
    return cmd, env


def _block_bytes(model: Path, dtype: str) -> int:
    cfg = json.loads((model / "config.json").read_text())
    elem = 4 if dtype == "float32" else 2
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    return 16 * per_token * elem


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 2}
            if httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server not ready in {timeout_s:.0f}s; see {log}")


def drive(url: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``pdserve bench serve`` run against ``url``; its summary."""
    cmd = [sys.executable, "-m", "bench.serve", "--base-url", url, "--model", MODEL_NAME,
           "--tokenizer", str(args.serve_tokenizer), "--dataset", "random",
           "--num-prompts", str(args.num_requests), "--random-input-len", "144",
           "--random-output-len", "96", "--random-range-ratio", "0.5", "--ignore-eos",
           "--request-rate", str(args.serve_request_rate), "--seed", str(args.seed),
           "--warmup", "2", "--disable-tqdm", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=args.run_timeout)
    data = json.loads(out.read_text())
    summary = data.get("summary", data)
    return {k: round(summary[k], 2) for k in KEPT if k in summary}


def serve_one(engine: str, model: Path, dtype: str, args, tmp: Path) -> dict[str, Any]:
    port = free_port()
    cmd, env = server_cmd(engine, model, dtype, port, args)
    log = tmp / f"{engine}-{dtype}-server.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, timeout_s=600)
        return drive(url, tmp / f"{engine}-{dtype}.json", args)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_view(shape: str, model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per dtype: both servers' figures and the output-throughput ratio."""
    args.serve_tokenizer = model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            got = {e: serve_one(e, model, dtype, args, Path(tmp)) for e in ("pdserve", "vllm")}
            ratio = got["pdserve"]["output_throughput"] / got["vllm"]["output_throughput"]
            rows.append(
                {"shape": shape, "dtype": dtype, **got, "throughput_ratio": round(ratio, 2)}
            )
            logger.info("serving %s %s: throughput ratio %.2f", shape, dtype, ratio)
    return rows
