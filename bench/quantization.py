"""Quantization: bf16 vs FP8 vs INT8 weights (decode tok/s, prefill tok/s, weight bytes,
peak memory), plus the KV half from ``bench/quantization_kv.py`` when it is there.

    python -m bench.quantization [--json] [--hidden 1024] [--layers 12] [--tokens 48]
                                 [--batch 1] [--prompt 64] [--runs 3] [--rounds 2]

One random Llama-shaped checkpoint (hidden 1024 x 12 layers by default: 16 heads of 64,
8 KV heads, intermediate 2816) is written dense and in compressed-tensors FP8 (W8A16,
per-channel) and INT8 (W8A16, per-channel, pack-quantized) from the same weights. Each
variant runs in its own child process (so its peak RSS is its own) with bf16
activations: it generates ``--tokens`` greedy tokens for ``--batch`` prompts of
``--prompt`` tokens, ``--runs`` times; decode tok/s = the tokens after the first over the
time after the first (median run). The variants run in ``--rounds`` interleaved rounds
and each keeps its best round (the box is shared). The last line printed is JSON with
``int8_decode_speedup`` and ``fp8_decode_speedup`` (tok/s / bf16's) and, from
``bench.quantization_kv.measure_kv`` when that module exists, its ``kv_*`` figures
(``kv_bytes_ratio_fp8``); without it they are ``null`` and ``kv_source`` says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench.quantization")
VARIANTS = {"bf16": None, "fp8": "fp8", "int8": "int8"}


def _shape(hidden: int, layers: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 128,
        "head_dim": 64,
    }


def _run_variant(model: str, batch: int, prompt: int, tokens: int, runs: int) -> dict:
    """In the child: load, generate, time."""
    import torch

    from engine import LLM, SamplingParams
    from engine.tiny_model import VOCAB_SIZE

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    llm = LLM(model, dtype="bfloat16")
    weight_bytes = _weight_bytes(llm.engine.model)
    rss_loaded = _rss_now()
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, VOCAB_SIZE, (prompt,), generator=gen).tolist() for _ in range(batch)
    ]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, first)  # warm-up
    prefill, total = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        llm.generate(prompts, first)
        t1 = time.perf_counter()
        llm.generate(prompts, full)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        total.append(t2 - t1)
    p, t = statistics.median(prefill), statistics.median(total)
    return {
        "decode_tok_s": batch * (tokens - 1) / max(t - p, 1e-9),
        "prefill_tok_s": batch * prompt / p,
        "weight_bytes": weight_bytes,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _weight_bytes(model) -> int:
    """Bytes the weights hold: parameters, oneDNN-prepacked matrices (from their logical
    size) and a quantized layer's dequantized CPU copy (engine/quant/linear.py)."""
    import torch

    total = 0
    for m in model.modules():
        quant = getattr(m, "quant", None)
        held = [*m.parameters(recurse=False), getattr(m, "packed", None)]
        held += [getattr(quant, "dense", None), getattr(quant, "packed_scale", None)]
        for t in held:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(args: argparse.Namespace, model: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.quantization", "--child", str(model)]
    cmd += ["--batch", str(args.batch), "--prompt", str(args.prompt)]
    cmd += ["--tokens", str(args.tokens), "--runs", str(args.runs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kv_figures() -> dict:
    """The KV half, if quant-kv's module is in this tree (the hook for it)."""
    try:
        from bench.quantization_kv import measure_kv
    except ImportError:
        return {"kv_bytes_ratio_fp8": None, "kv_source": "bench/quantization_kv.py absent"}
    return {**measure_kv(), "kv_source": "bench.quantization_kv.measure_kv"}


def _measure(args: argparse.Namespace) -> dict:
    from engine.tiny_model import make_tiny_model

    shape = _shape(args.hidden, args.layers)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pdserve-quant-bench-") as tmp:
        dirs = {}
        for name, preset in VARIANTS.items():
            logger.info("building the %s checkpoint (hidden %d x %d layers)", name, args.hidden, args.layers)  # fmt: skip
            dirs[name] = make_tiny_model(
                "llama", Path(tmp) / name, overrides=shape, quantize=preset
            )
        # Interleaved rounds, best of each: the box is shared, and a burst of someone
        # else's load should not land on one variant only.
        for round_ in range(args.rounds):
            for name, d in dirs.items():
                logger.info("round %d: running %s", round_ + 1, name)
                r = _child(args, d)
                logger.info("%s: %s", name, r)
                best = results.get(name)
                if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                    results[name] = r
    bf16 = results["bf16"]["decode_tok_s"]
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_1m": os.getloadavg()[0],
        "shape": shape,
        "batch": args.batch,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "variants": results,
        "int8_decode_speedup": results["int8"]["decode_tok_s"] / bf16,
        "fp8_decode_speedup": results["fp8"]["decode_tok_s"] / bf16,
        "int8_weight_bytes_ratio": results["int8"]["weight_bytes"]
        / results["bf16"]["weight_bytes"],  # fmt: skip
        "fp8_weight_bytes_ratio": results["fp8"]["weight_bytes"] / results["bf16"]["weight_bytes"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept")
    parser.add_argument("--no-kv", action="store_true", help="skip the KV half")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_run_variant(args.child, args.batch, args.prompt, args.tokens, args.runs)))
        return
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    out = _measure(args)
    out.update({} if args.no_kv else _kv_figures())
    if not args.json:
        for name, r in out["variants"].items():
            print(f"{name:5s} decode {r['decode_tok_s']:7.1f} tok/s  prefill {r['prefill_tok_s']:7.1f} tok/s  weights {r['weight_bytes'] / 2**20:7.1f} MiB  RSS loaded {r['rss_after_load_bytes'] / 2**20:7.1f} MiB  peak {r['peak_rss_bytes'] / 2**20:7.1f} MiB")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
