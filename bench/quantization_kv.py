"""The KV half of the quantization benchmark: bf16 vs fp8 vs int8 KV cache, in one run.

    python -m bench.quantization_kv [--json] [--model DIR] [--tokens 1024] [--runs 5]

Per KV dtype it builds a real engine (bf16 weights) whose pool sizes itself from one byte
budget, prefills a prompt so the blocks hold real (quantized) K/V, then moves that
prompt's blocks over the ``tcp`` transport to a receiver endpoint in the same process,
``--runs`` times. Figures per dtype: the pool's bytes per token and tokens held, the
bytes per token the receiver counted (values and scales), and the transfer's median
tokens/s and GB/s. ``bench/quantization.py`` (the weights half) calls :func:`measure_kv`.

Without ``--model`` it uses a tiny Llama with a real model's KV row (head_dim 128, 2 KV
heads, 4 layers): the KV figures depend only on that layout. The last line printed is
JSON with ``kv_bytes_ratio_fp8`` (fp8 transfer bytes per token / bf16's, as measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from engine import LLM, SamplingParams
from engine.kv_cache.layout import KVLayout
from engine.tiny_model import make_tiny_model
from kv_transfer import TransferState, make_client, make_endpoint

logger = logging.getLogger("bench.quantization_kv")
KV_DTYPES = ("auto", "fp8_e4m3", "int8")
"""``auto`` runs the bf16 cache (the engine runs in bfloat16)."""
KV_SHAPE = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 128,
}  # fmt: skip
BUDGET = 64 * 2**20


def _poll(done, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"transfer did not finish within {timeout}s")
        time.sleep(0.0005)


def _transfer_once(engine, dst_layout: KVLayout, blocks: list[int]) -> tuple[float, int]:
    """Seconds for one prompt's blocks (every layer) over tcp, and the bytes received."""
    spec, free = engine.layout_spec, []
    endpoint = make_endpoint("tcp", dst_layout, dst_layout.allocate(), spec, free.extend)
    client = make_client("tcp", spec)
    try:
        client.connect(endpoint.address)  # pair first: the handshake is not the transfer
        rx = endpoint.expect(list(range(len(blocks))), lease_s=60)
        tx = client.open(rx.ticket)
        start = time.perf_counter()
        for layer, (k, v) in enumerate(engine.kv_caches):
            tx.send_layer(layer, k, v, src_block_ids=blocks)
        tx.finish()
        _poll(lambda: rx.poll().terminal and tx.poll().terminal)
        took = time.perf_counter() - start
        if (rx.poll(), tx.poll()) != (TransferState.SUCCESS,) * 2:
            raise RuntimeError(f"transfer failed: {rx.error or tx.error}")
        return took, endpoint.stats()["received_bytes"]
    finally:
        client.close()
        endpoint.close()


def _one_dtype(model: Path, kv_cache_dtype: str, prompt: list[int], runs: int) -> dict:
    llm = LLM(model, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=BUDGET)
    engine = llm.engine
    blocks = _prefill(engine, prompt)
    layout = engine.layout
    dst = KVLayout(layout.num_layers, len(blocks), layout.block_size, layout.num_kv_heads,
                   layout.head_dim, layout.dtype, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    times, received = [], 0
    for _ in range(runs):
        took, received = _transfer_once(engine, dst, blocks)
        times.append(took)
    engine.release("bench")
    tokens = len(blocks) * layout.block_size
    seconds = statistics.median(times)
    return {
        "pool_bytes_per_token": layout.bytes_per_token,
        "pool_tokens": layout.num_blocks * layout.block_size,
        "transfer_bytes_per_token": received / tokens,
        "transfer_tokens_per_s": tokens / seconds,
        "transfer_gbps": received / seconds / 1e9,
        "transfer_seconds": seconds,
        "tokens": tokens,
    }


def _prefill(engine, prompt: list[int]) -> list[int]:
    """A prefill-only request run to its end: its blocks, held for the sender."""
    engine.add_request("bench", prompt, SamplingParams(max_tokens=1), prefill_only=True)
    while engine.has_unfinished_requests():
        engine.step()
    return engine.kv.block_ids("bench")


def measure_kv(model: str | None = None, tokens: int = 1024, runs: int = 5) -> dict:
    """The KV figures for bf16 vs fp8 vs int8 (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model) if model else make_tiny_model("llama", Path(tmp) / "kv", overrides=KV_SHAPE)  # fmt: skip
        prompt = [3 + (i * 7919) % 500 for i in range(tokens)]
        per = {}
        for kv in KV_DTYPES:
            logger.info("KV cache %s: pool, prefill, %d transfers of %d tokens", kv, runs, tokens)
            per["bf16" if kv == "auto" else kv] = _one_dtype(path, kv, prompt, runs)
    bf16, fp8 = per["bf16"], per["fp8_e4m3"]
    return {
        "kv": per,
        "kv_bytes_ratio_fp8": fp8["transfer_bytes_per_token"] / bf16["transfer_bytes_per_token"],
        "kv_pool_bytes_ratio_fp8": fp8["pool_bytes_per_token"] / bf16["pool_bytes_per_token"],
        "kv_pool_tokens_ratio_fp8": fp8["pool_tokens"] / bf16["pool_tokens"],
        "kv_transfer_speedup_fp8": fp8["transfer_tokens_per_s"] / bf16["transfer_tokens_per_s"],
        "kv_bytes_ratio_int8": per["int8"]["transfer_bytes_per_token"]
        / bf16["transfer_bytes_per_token"],  # fmt: skip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    ap.add_argument(
        "--model", default=None, help="a checkpoint (default: a tiny head_dim-128 Llama)"
    )
    ap.add_argument("--tokens", type=int, default=1024, help="prompt tokens per transfer")
    ap.add_argument("--runs", type=int, default=5, help="transfers per KV dtype (median)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO)
    result = measure_kv(args.model, args.tokens, args.runs)
    if not args.json:
        for name, row in result["kv"].items():
            print(f"{name:9s} " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
