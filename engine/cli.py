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
from pathlib import Path

DEMO_ARCH = "llama"


def demo_model_dir() -> Path:
    """Where the tiny demo model is cached (``$PDSERVE_CACHE`` or ``~/.cache/pdserve``)."""
    root = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return root / f"tiny-{DEMO_ARCH}"


def ensure_demo_model() -> Path:
    """Build the deterministic demo model on first use and return its directory."""
    from engine.tiny_model import make_tiny_model

    path = demo_model_dir()
    if not (path / "config.json").is_file():
        logging.getLogger("pdserve").info("building the tiny demo model in %s", path)
        make_tiny_model(DEMO_ARCH, path)
    else:
        refresh_chat_template(path)
    return path


def refresh_chat_template(path: Path) -> None:
    """A demo model built by an older pdserve gets the current chat template (it renders
    tools now); weights and tokenizer are unchanged."""
    import json

    from engine.chat_templates import TEMPLATES

    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("chat_template") != TEMPLATES["hermes"]:
        cfg["chat_template"] = TEMPLATES["hermes"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _configure_threads() -> None:
    # Small CPU boxes: more than one OpenMP thread makes small matmuls ~200x slower
    # whenever any other process is busy.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local HF checkpoint dir (default: the tiny demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import make_tiny_model

    path = make_tiny_model(args.arch, args.dir, seed=args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from engine import LLM, SamplingParams

    model = args.model or ensure_demo_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM(
        model,
        dtype=args.dtype,
        device=device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-init HF checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"],
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny_model)

    gen = sub.add_parser("generate", help="offline generation")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    from router.serve import add_serve_args, add_worker_args, cmd_serve, cmd_worker

    serve = sub.add_parser("serve", help="serve the OpenAI API with prefill/decode workers")
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run one prefill or decode worker (no Ray)")
    add_engine_args(worker)
    add_worker_args(worker)
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
