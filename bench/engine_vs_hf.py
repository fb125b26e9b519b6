"""Engine throughput vs Hugging Face ``generate`` on the same tiny Llama, in one process.

64 requests, seeded prompt lengths 32-256 and output lengths 64-128 (``ignore_eos``).
Ours: all submitted at once (continuous batching). HF: static batches of 16, left-padded,
each batch generating to its longest request. Only the tokens each request asked for count.

    python -m bench.engine_vs_hf --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

logger = logging.getLogger("bench.engine_vs_hf")


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, 500) for _ in range(rng.randint(32, 256))], rng.randint(64, 128))
        for _ in range(n)
    ]


def run_engine(model_dir: str, reqs: list[tuple[list[int], int]]) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(model_dir)
    llm.generate([reqs[0][0]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == [m for _, m in reqs]
    return sum(m for _, m in reqs) / elapsed


def run_hf(model_dir: str, reqs: list[tuple[list[int], int]], batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    counted, elapsed = 0, 0.0
    for b in range(0, len(reqs), batch_size):
        batch = reqs[b : b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(m for _, m in batch),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        elapsed += time.perf_counter() - start
        counted += sum(m for _, m in batch)
        logger.info("HF batch %d/%d done", b // batch_size + 1, -(-len(reqs) // batch_size))
    return counted / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="checkpoint dir (default: a fresh tiny Llama)")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from engine.tiny_model import make_tiny_model

            model_dir = str(make_tiny_model("llama", tmp))
        reqs = workload(args.num_requests, args.seed)
        engine_tok_s = run_engine(model_dir, reqs)
        hf_tok_s = run_hf(model_dir, reqs, args.hf_batch_size)
    result = {
        "engine_tok_s": round(engine_tok_s, 1),
        "hf_tok_s": round(hf_tok_s, 1),
        "ratio": round(engine_tok_s / hf_tok_s, 2),
        "num_requests": args.num_requests,
        "output_tokens": sum(m for _, m in reqs),
    }
    if not args.json:
        print(f"engine: {engine_tok_s:.0f} tok/s   HF generate: {hf_tok_s:.0f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
