"""Expert-parallel dispatch+combine cost vs a raw ``all_to_all_single`` of the routing's bytes.

    python -m bench.moe_ep [--json] [--iters 20] [--tokens 512]

One MoE layer of a Mixtral-shaped config (8 experts, top-2) scaled to this machine
(hidden 1024 on CPU, 4096 on CUDA), EP=2 on CPU (gloo, two spawned processes) or EP=N
with NCCL over N GPUs when there are at least two. Each rank holds ``--tokens`` tokens
routed by a random gate. Per iteration, interleaved: ``dispatch`` + ``combine`` of
``engine/parallel/ep.py`` (identity experts weighted by the routing, so only
communication and bookkeeping are timed); two raw ``all_to_all_single`` calls there and
back with one row per (token, expert) slot, the exchange the routing asks for
(``ratio``, goal <= 1.3); and two raw calls moving only the rows dispatch really sends
after dedup (``ratio_vs_dedup_rows``: dispatch's own overhead over its wire bytes).
Medians over ``--iters``. The last line printed is JSON with both ratios, the rows sent
per rank (slots, deduplicated) and the workload's expert ``balancedness`` (mean/max
tokens per expert).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.layers.moe import route
from engine.parallel.ep import ExpertParallelGroup, combine, dispatch

logger = logging.getLogger("bench.moe_ep")
NUM_EXPERTS, TOP_K = 8, 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, group) -> float:
    dist.barrier(group=group)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rank(rank: int, size: int, port: int, args, out: str) -> None:
    cuda = args.backend == "nccl"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=120),
    )
    ep = ExpertParallelGroup(rank, size)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    gate = torch.randn(NUM_EXPERTS, args.hidden, generator=torch.Generator().manual_seed(0))
    weights, ids = route(x.float().cpu() @ gate.T * 0.05, TOP_K, True, dtype)
    weights, ids = weights.to(device), ids.to(device)

    start, end = ep.expert_range(NUM_EXPERTS)

    def ep_step():
        d = dispatch(x, weights, ids, NUM_EXPERTS, ep)
        mine = (d.expert_ids >= start) & (d.expert_ids < end)  # identity experts, weighted
        combine(d.x * (d.weights * mine).sum(1, keepdim=True), d)

    ep_step()
    slots, rows = _raw_steps(x, ids, dispatch(x, weights, ids, NUM_EXPERTS, ep), size)
    ep_times, raw_times, dedup_times = [], [], []
    for i in range(args.iters + 3):
        t_ep, t_raw = _timed(ep_step, device, None), _timed(slots, device, None)
        t_dedup = _timed(rows, device, None)
        if i >= 3:
            ep_times.append(t_ep)
            raw_times.append(t_raw)
            dedup_times.append(t_dedup)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=NUM_EXPERTS)
    dist.all_reduce(counts.to(device), group=None) if cuda else dist.all_reduce(counts)
    if rank == 0:
        result = _result(args, size, dtype, x, ep_times, raw_times, dedup_times)
        result["rows_sent_per_rank"] = slots.rows, rows.rows
        result["tokens_per_expert"] = counts.tolist()
        result["balancedness"] = round(counts.float().mean().item() / counts.max().item(), 3)
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


class _Raw:
    """Two raw ``all_to_all_single`` calls (there and back) of ``rows`` hidden rows split
    ``send``/``recv`` per rank: nothing but the transfer."""

    def __init__(self, x: torch.Tensor, send: list[int], recv: list[int]):
        self.send, self.recv, self.rows = send, recv, sum(send)
        self.out = x.new_empty(sum(send), x.shape[1]).normal_()
        self.into = x.new_empty(sum(recv), x.shape[1])
        self.back = torch.empty_like(self.out)

    def __call__(self) -> None:
        dist.all_to_all_single(self.into, self.out, self.recv, self.send)
        dist.all_to_all_single(self.back, self.into, self.send, self.recv)


def _raw_steps(x, ids, d, size: int) -> tuple[_Raw, _Raw]:
    """The raw exchange of one row per (token, expert) slot, the routing's bytes without
    dedup (the baseline of the 1.3 goal), and of the rows ``dispatch`` really sends."""
    send = torch.bincount(ids.reshape(-1) // (NUM_EXPERTS // size), minlength=size)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    # Hidden columns only: the 2k id/weight columns dispatch adds are its own cost.
    return _Raw(x, send.tolist(), recv.tolist()), _Raw(x, d.send_splits, d.recv_splits)


def _result(args, size, dtype, x, ep_times, raw_times, dedup_times) -> dict:
    ep_ms = statistics.median(ep_times) * 1e3
    raw_ms = statistics.median(raw_times) * 1e3
    dedup_ms = statistics.median(dedup_times) * 1e3
    per = [a / b for a, b in zip(ep_times, raw_times, strict=True)]
    return {
        "backend": args.backend,
        "ep_size": size,
        "tokens_per_rank": args.tokens,
        "hidden": args.hidden,
        "dtype": str(dtype).removeprefix("torch."),
        "dispatch_combine_ms": round(ep_ms, 3),
        "raw_all_to_all_ms": round(raw_ms, 3),
        "raw_dedup_rows_ms": round(dedup_ms, 3),
        "ratio": round(ep_ms / raw_ms, 3),
        "ratio_range": [round(min(per), 3), round(max(per), 3)],
        "ratio_vs_dedup_rows": round(ep_ms / dedup_ms, 3),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    gpus = torch.cuda.device_count()
    args.backend = "nccl" if gpus >= 2 else "gloo"
    size = gpus if gpus >= 2 else 2
    args.hidden = args.hidden or (4096 if args.backend == "nccl" else 1024)
    logger.info(
        "EP=%d over %s, hidden %d, %d tokens/rank", size, args.backend, args.hidden, args.tokens
    )
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank, args=(size, _free_port(), args, out), nprocs=size, join=True)
        with open(out) as f:
            result = json.load(f)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
