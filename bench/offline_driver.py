"""One timed offline run of one engine (pdserve or vLLM) in this process; a JSON line out.

``bench.engine_vs_vllm`` starts this in a fresh process per run: with ``.venv`` for
pdserve (``python -m bench.offline_driver pdserve ...``) and with ``.venv-peer`` for vLLM
(``.venv-peer/bin/python bench/offline_driver.py vllm ...``, which must not import
pdserve). Both read the same workload file (token-id prompts and output lengths), warm
up on one short request, then submit every request at once and time until the last
token. vLLM starts its engine-core process with spawn, hence the ``__main__`` guard.

The result is the last line on stdout (vLLM logs on stdout, so the parent takes the
last line that parses as JSON)::

    {"engine": "vllm", "tok_s": 401.2, "elapsed_s": 15.3, "output_tokens": 6144,
     "startup_s": 41.0, "peak_rss_mib": 812.4, "threads": 1}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (MiB), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


class PeakRSS:
    """Samples the process tree's RSS every ``interval`` s; ``peak`` is the largest sum."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, tree_rss_mib(os.getpid()))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mib(os.getpid()))
        return self.peak


def run_pdserve(args: argparse.Namespace, reqs: list) -> tuple[float, float]:
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    llm.generate([reqs[0][0]], SamplingParams(max_tokens=4, ignore_eos=True))
    startup = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate([p for p, _ in reqs], params)
    elapsed = time.perf_counter() - start
    # CPU seconds of this process (all its threads): steadier than wall time on a busy box.
    args.cpu_s = round(time.process_time() - cpu, 2)
    assert [len(o.token_ids) for o in outs] == [m for _, m in reqs]
    return elapsed, startup


def run_vllm(args: argparse.Namespace, reqs: list) -> tuple[float, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=0,
    )
    warm = [TokensPrompt(prompt_token_ids=reqs[0][0])]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    startup = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == [m for _, m in reqs]
    return elapsed, startup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=["pdserve", "vllm"])
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True, help="JSON [[prompt_ids, max_tokens], ...]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-gib", type=float, default=2.0, help="KV cache budget (GiB)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = p.parse_args()
    with open(args.workload) as f:
        reqs = json.load(f)
    rss = PeakRSS()
    run = run_pdserve if args.engine == "pdserve" else run_vllm
    elapsed, startup = run(args, reqs)
    tokens = sum(m for _, m in reqs)
    result = {
        "engine": args.engine,
        "tok_s": round(tokens / elapsed, 1),
        "elapsed_s": round(elapsed, 2),
        "output_tokens": tokens,
        "startup_s": round(startup, 1),
        "peak_rss_mib": round(rss.stop(), 1),
        "threads": args.threads,
    }
    if hasattr(args, "cpu_s"):
        result["cpu_s"] = args.cpu_s
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
