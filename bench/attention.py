"""Decode-attention bandwidth benchmark: ``python -m bench.attention [--json]``.

For each (batch, context) it times ``paged_decode_attention`` (bf16 KV, head dim 128,
8 KV heads / 32 query heads, block size 16, shuffled block tables) and reports

    achieved GB/s = (bytes of K and V read + bytes of Q read) / kernel time

with L2 flushed before every timed run, next to the device-to-device copy bandwidth
measured in the same run (``copy_gbps``: bytes read + bytes written by ``dst.copy_(src)``
on a 1 GiB buffer, so both numbers count DRAM traffic) and their ``ratio``. It also
reports the split-KV speedup over a single-pass kernel (``num_splits=1``) at batch 1,
context 16384, where one pass leaves most SMs idle.

Output: one line per measurement; with ``--json`` they are JSON objects and the last one
is a summary carrying ``ratio`` (the lowest achieved/copy ratio over the grid). Without
CUDA it prints ``{"skipped": "no CUDA device"}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable

import torch

log = logging.getLogger("bench.attention")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
GRID = [(16, 4096), (16, 16384), (64, 4096), (64, 16384)]
L2_FLUSH_BYTES = 512 * 2**20  # larger than any current GPU's L2
COPY_BYTES = 2**30
SPLIT_CONTEXT = 16384  # batch 1: where a single pass leaves most SMs idle


def _time_us(fn: Callable[[], object], iters: int, flush: torch.Tensor | None) -> float:
    """Median microseconds of ``fn`` over ``iters`` runs, each timed alone by CUDA events."""
    fn()  # warm-up (and compile)
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_gbps(iters: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src), iters, flush=None)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def _decode_inputs(batch: int, context: int) -> dict:
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    block_tables = (
        torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
        .reshape(batch, blocks_per_seq)
        .contiguous()
    )
    return {
        "query": torch.randn((batch, NUM_HEADS, HEAD_DIM), dtype=DTYPE, device="cuda"),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
    }


def decode_point(batch: int, context: int, iters: int, flush: torch.Tensor) -> dict:
    from engine.kernels.paged_decode_attention import paged_decode_attention

    args = _decode_inputs(batch, context)
    out = torch.empty_like(args["query"])
    us = _time_us(
        lambda: paged_decode_attention(**args, scale=HEAD_DIM**-0.5, max_seq_len=context, out=out),
        iters,
        flush,
    )
    elem = torch.empty((), dtype=DTYPE).element_size()
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * elem
    q_bytes = batch * NUM_HEADS * HEAD_DIM * elem
    return {
        "bench": "decode_attention",
        "batch": batch,
        "context": context,
        "us": round(us, 2),
        "gbps": round((kv_bytes + q_bytes) / (us * 1e-6) / 1e9, 1),
    }


def split_speedup(context: int, iters: int, flush: torch.Tensor) -> dict:
    from engine.kernels.paged_decode_attention import paged_decode_attention

    args = _decode_inputs(1, context)
    out = torch.empty_like(args["query"])

    def run(num_splits: int | None) -> float:
        return _time_us(
            lambda: paged_decode_attention(
                **args, scale=HEAD_DIM**-0.5, max_seq_len=context, num_splits=num_splits, out=out
            ),
            iters,
            flush,
        )

    single, split = run(1), run(None)
    return {
        "bench": "split_kv_speedup",
        "batch": 1,
        "context": context,
        "single_pass_us": round(single, 2),
        "split_kv_us": round(split, 2),
        "speedup": round(single / split, 2),
    }


def run(iters: int) -> list[dict]:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    log.info("measuring device-to-device copy bandwidth")
    copy = copy_gbps(iters)
    rows = []
    for batch, context in GRID:
        log.info("decode attention: batch %d, context %d", batch, context)
        row = decode_point(batch, context, iters, flush)
        row["copy_gbps"] = round(copy, 1)
        row["ratio"] = round(row["gbps"] / copy, 3)
        rows.append(row)
        torch.cuda.empty_cache()
    log.info("split-KV vs single pass: batch 1, context %d", SPLIT_CONTEXT)
    rows.append(split_speedup(SPLIT_CONTEXT, iters, flush))
    rows.append(
        {
            "bench": "summary",
            "device": torch.cuda.get_device_name(),
            "copy_gbps": round(copy, 1),
            "min_gbps": min(r["gbps"] for r in rows if "gbps" in r),
            "split_kv_speedup": rows[-1]["speedup"],
            "ratio": min(r["ratio"] for r in rows if "ratio" in r),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per point")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    for row in run(args.iters):
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
