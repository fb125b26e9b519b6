"""``pdserve bench serve`` (also ``python -m bench.serve``) and the ``pdserve bench`` group.

    pdserve bench serve --base-url http://127.0.0.1:8000 --dataset random --num-prompts 100 \\
        --request-rate 4 --goodput ttft:500 tpot:50 --json out.json --plot plots/
    pdserve bench compare --json     (python -m bench.compare: aggregated vs disaggregated)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os

logger = logging.getLogger("bench.serve")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])  # fmt: skip
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key")
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt", "mooncake-trace"])  # fmt: skip
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON or Mooncake JSONL trace")
    p.add_argument("--num-prompts", type=int, default=100, help="trace: first N rows (default all)")  # fmt: skip
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override reply lengths")
    p.add_argument("--trace-speedup", type=float, default=1.0, help="divide trace gaps by this")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale trace lengths/blocks")
    p.add_argument("--max-total-len", type=int, default=None, help="trace: drop longer rows")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf = at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")  # fmt: skip
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests first")
    p.add_argument("--tokenizer", default=None, help="checkpoint dir (default: the demo model)")
    p.add_argument("--prompt-format", default="ids", choices=["ids", "text"], help="send token ids or decoded text")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="write records and summary")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots")


def load_tokenizer(path: str | None):
    from engine.tokenizer import Tokenizer

    if path is None:
        from engine.tiny_model import ensure_demo_model

        path = str(ensure_demo_model())
    return Tokenizer.from_dir(path)


def load_requests(args: argparse.Namespace, tokenizer) -> list:
    from bench.serve import datasets as ds

    if args.dataset != "random" and not args.dataset_path:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
    vocab = tokenizer.vocab_size
    if args.dataset == "random":
        return ds.random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len,
            args.random_range_ratio, vocab, args.seed,
        )  # fmt: skip
    if args.dataset == "sharegpt":
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        return ds.sharegpt_requests(args.dataset_path, args.num_prompts, encode, args.seed, args.sharegpt_output_len)  # fmt: skip
    return ds.mooncake_requests(
        args.dataset_path, args.num_prompts, vocab, args.seed, args.trace_speedup,
        args.length_scale, args.max_total_len,
    )  # fmt: skip


def as_text(requests: list, tokenizer) -> list:
    from dataclasses import replace

    return [
        r
        if isinstance(r.prompt, str)
        else replace(r, prompt=tokenizer.decode(r.prompt, skip_special_tokens=False))  # fmt: skip
        for r in requests
    ]


async def _resolve_model(args: argparse.Namespace) -> str:
    import httpx

    from bench.serve.client import first_model

    async with httpx.AsyncClient(timeout=30) as http:
        try:
            return await first_model(http, args.base_url, args.api_key)
        except httpx.HTTPError as exc:
            raise ValueError(
                f"cannot list models at {args.base_url}: {exc}; is the server up?"
            ) from None


def run_from_args(args: argparse.Namespace):
    """Build the workload and run it; returns the BenchResult."""
    from bench.serve.client import ClientConfig
    from bench.serve.metrics import parse_goodput
    from bench.serve.runner import RunConfig, run

    goodput = parse_goodput(args.goodput)
    cfg = RunConfig(
        args.request_rate, args.burstiness, args.max_concurrency, args.seed, args.warmup,
        goodput, args.request_timeout, not args.disable_tqdm,
    )  # fmt: skip
    tokenizer = load_tokenizer(args.tokenizer)
    requests = load_requests(args, tokenizer)
    if args.prompt_format == "text" or args.endpoint.endswith("/chat/completions"):
        requests = as_text(requests, tokenizer)
    model = args.model or asyncio.run(_resolve_model(args))
    client = ClientConfig(args.base_url, model, args.endpoint, args.ignore_eos, args.temperature, args.api_key)  # fmt: skip
    logger.info("%d %s requests -> %s (%s)", len(requests), args.dataset, client.url, model)
    result = asyncio.run(run(client, cfg, requests))
    result.config["dataset"] = args.dataset
    return result


def cmd_serve(args: argparse.Namespace) -> int:
    from bench.serve.report import format_table, write_json, write_plots

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    result = run_from_args(args)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot:
        for path in write_plots(args.plot, {"run": result.records}):
            print(f"wrote {path}")
    return 0 if result.summary["completed"] else 1


def add_bench_commands(sub) -> None:
    """``pdserve bench {serve,compare}`` under the ``pdserve`` subparsers ``sub``."""
    bench = sub.add_parser("bench", help="serving benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_sub.add_parser("serve", help="load-generate against an OpenAI-compatible server")  # fmt: skip
    add_args(serve)
    serve.set_defaults(func=cmd_serve)
    from bench import compare

    cmp = bench_sub.add_parser("compare", help="aggregated vs disaggregated A/B on this machine")
    compare.add_args(cmp)
    cmp.set_defaults(func=compare.cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])  # fmt: skip
    add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return cmd_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
