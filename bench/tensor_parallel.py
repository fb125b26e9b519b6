"""Tensor parallelism: TP=2 vs TP=1 decode step time, and the engine's all-reduce time
against a raw ``all_reduce`` of the same bytes in the same run.

    python -m bench.tensor_parallel [--json] [--batch 8] [--steps 20] [--context 128]
                                    [--hidden 1024] [--layers 12]

A random Llama-shaped checkpoint (hidden 1024 x 12 layers by default: 16 heads of 64, 8
KV heads, intermediate 2816, float32) is built in a temporary directory. Each run admits
``--batch`` requests of ``--context`` prompt tokens, prefills them, then times
``--steps`` decode steps (``LLMEngine.step`` on the leader, wall clock, median). TP=2 runs
on two spawned ranks over gloo on CPU, or NCCL over two GPUs where there are two; TP=1 in
this process. In the TP run the leader also times every all-reduce of the model (the
vocabulary-parallel embedding, each attention output and each MLP down projection: ``1 +
2 x layers`` per step, ``[batch, hidden]`` each) and, after the steps, the same number of
raw ``dist.all_reduce`` calls on tensors of the same shape. The last line printed is
JSON: ``speedup`` (TP=1 step / TP=2 step) and ``allreduce_vs_raw`` (goal <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import LLM, SamplingParams
from engine.parallel import tp_layers
from engine.parallel.group import group_store, join_group
from engine.tiny_model import make_tiny_model

logger = logging.getLogger("bench.tensor_parallel")


class _Clock:
    """Wall time and calls of the model's all-reduces on this rank."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        real = tp_layers.TPGroup.all_reduce

        def timed(group, x):
            t0 = time.perf_counter()
            out = real(group, x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.bytes = x.numel() * x.element_size()
            return out

        tp_layers.TPGroup.all_reduce = timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _decode_steps(llm: LLM, args, clock: _Clock | None = None) -> list[float]:
    """Prefill ``batch`` prompts, then the wall time of each of ``steps`` decode steps
    (``clock`` counts from the first of them)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=args.steps + 4, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        engine.add_request(f"b{i}", torch.randint(3, 500, (args.context,), generator=g).tolist(), params)  # fmt: skip
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):  # fmt: skip
        engine.step()
    engine.step()  # one decode step to warm up
    if clock is not None:
        clock.reset()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def _raw_allreduce(calls: int, nbytes: int, steps: int, device) -> list[float]:
    """Per step, ``calls`` raw all-reduces of ``nbytes`` (float32), back to back."""
    x = torch.randn(max(nbytes // 4, 1), device=device)
    out = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            dist.all_reduce(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        out.append(time.perf_counter() - t0)
    return out[1:]


def _rank(rank: int, size: int, port: int, model: str, args, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    device = f"cuda:{rank}" if args.backend == "nccl" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False)
    parallel = join_group(rank, size, 1, None, device, store=store)
    clock = _Clock()
    llm = LLM(model, parallel=parallel, device=device, **_engine_args(args))
    follower = torch.zeros(2, dtype=torch.float64)
    if rank == 0:
        steps = _decode_steps(llm, args, clock)
        per_step = clock.seconds / args.steps, clock.calls // args.steps
        llm.engine.stop_followers()
        dist.recv(follower, 1, group=parallel.control_group)
    else:
        follower = _follow_timed(llm, clock, args.steps)
        dist.send(follower, 0, group=parallel.control_group)
    dev = torch.device(device)
    raw = _raw_allreduce(1 + 2 * args.layers, clock.bytes, args.steps, dev)
    if rank == 0:
        result = {"steps": steps, "allreduce_s": per_step[0], "raw": raw, "calls": per_step[1]}
        result |= {"bytes": clock.bytes, "follower_step_s": follower[0].item(), "follower_allreduce_s": follower[1].item()}  # fmt: skip
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def _follow_timed(llm: LLM, clock: _Clock, steps: int) -> torch.Tensor:
    """Follow until stopped; the medians of the last ``steps`` steps' time and
    all-reduce time on this rank (float64 ``[2]``)."""
    driver, seen = llm.engine.driver, []
    real = driver.follow

    def follow(msg, hook):
        t0, a0 = time.perf_counter(), clock.seconds
        real(msg, hook)
        seen.append((time.perf_counter() - t0, clock.seconds - a0))

    driver.follow = follow
    llm.engine.run_follower()
    last = seen[-steps:]
    return torch.tensor([statistics.median(t for t, _ in last), statistics.median(a for _, a in last)], dtype=torch.float64)  # fmt: skip


def _engine_args(args) -> dict:
    blocks = args.batch * (-(-(args.context + args.steps + 8) // 16))
    return {"num_kv_blocks": blocks, "max_num_batched_tokens": 2048, "max_num_seqs": args.batch}


def _tp2(model: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tp2.json")
        store = group_store("127.0.0.1", 2)
        mp.spawn(_rank, args=(2, store.port, model, args, out), nprocs=2, join=True)
        del store
        with open(out) as f:
            return json.load(f)


def _machine() -> dict:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)  # fmt: skip
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__}


def _result(args, tp1: list[float], tp2: dict, load: tuple) -> dict:
    ms = lambda s: round(s * 1e3, 3)  # noqa: E731
    t1, t2 = statistics.median(tp1), statistics.median(tp2["steps"])
    raw = statistics.median(tp2["raw"])
    return {
        "backend": args.backend,
        "model": {"hidden": args.hidden, "layers": args.layers, "dtype": "float32"},
        "batch": args.batch,
        "context": args.context,
        "tp1_step_ms": ms(t1),
        "tp2_step_ms": ms(t2),
        "speedup": round(t1 / t2, 3),
        "allreduce_calls_per_step": tp2["calls"],
        "allreduce_bytes": tp2["bytes"],
        "allreduce_ms_per_step": ms(tp2["allreduce_s"]),
        "allreduce_share_of_step": round(tp2["allreduce_s"] / t2, 3),
        "raw_allreduce_ms_per_step": ms(raw),
        "allreduce_vs_raw": round(tp2["allreduce_s"] / raw, 3),
        "follower_step_ms": ms(tp2["follower_step_s"]),
        "follower_allreduce_ms_per_step": ms(tp2["follower_allreduce_s"]),
        "machine": _machine(),
        "loadavg_before_after": [round(x, 2) for x in (*load, *os.getloadavg())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    args.backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    shape = {
        "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 128, "head_dim": 64,
    }  # fmt: skip
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model("llama", os.path.join(tmp, "model"), overrides=shape))
        logger.info("TP=2 over %s: %s", args.backend, shape)
        tp2 = _tp2(model, args)
        logger.info("TP=1")
        torch.set_num_threads(args.threads)
        device = "cuda" if args.backend == "nccl" else "cpu"
        tp1 = _decode_steps(LLM(model, device=device, **_engine_args(args)), args)
    result = _result(args, tp1, tp2, load)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>26}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
