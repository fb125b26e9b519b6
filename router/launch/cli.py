"""The ``pdserve`` command line.

pdserve make-tiny-model --arch llama DIR     write a tiny random-init checkpoint
pdserve generate [--model DIR] --prompt ...  offline generation (demo model by default)
pdserve serve [--prefill N --decode M] ...   OpenAI-compatible server (Ray + router)
pdserve worker --role prefill|decode ...     one standalone worker (no Ray)
pdserve bench serve|compare ...              serving load generator; aggregated vs disaggregated
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from router.launch.flags import add_engine_flags, add_serve_flags, add_worker_flags, engine_config


def _configure_threads() -> None:
    # Small CPU boxes: more than one OpenMP thread makes small matmuls ~200x slower
    # whenever any other process is busy.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.arch, args.dir, seed=args.seed, quantize=args.quantize)
    note = f" ({args.quantize} compressed-tensors weights)" if args.quantize else ""
    print(f"wrote tiny {args.arch} checkpoint{note} to {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(engine_config(args))  # --device auto resolves in the engine
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt, outputs, strict=True):
        print(
            f"prompt: {prompt!r}\noutput: {out.text!r}\n  ({len(out.token_ids)} tokens, finish={out.finish_reason})"
        )
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s)")
    return 0


def _add_tiny_model_parser(sub) -> None:
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-init HF checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"],
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--quantize",
        default=None,
        choices=["fp8", "fp8-tensor", "fp8-dynamic", "int8", "int8-group"],
        help="store the linear weights quantized, in compressed-tensors format",
    )
    tiny.set_defaults(func=_cmd_make_tiny_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_tiny_model_parser(sub)

    gen = sub.add_parser("generate", help="offline generation")
    add_engine_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    from router.launch.serve import cmd_serve, cmd_worker

    serve = sub.add_parser("serve", help="serve the OpenAI API with prefill/decode workers")
    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run one prefill or decode worker (no Ray)")
    add_worker_flags(worker)
    worker.set_defaults(func=cmd_worker)

    from bench.serve.cli import add_bench_commands

    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _configure_threads()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
