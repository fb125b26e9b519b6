"""The router-edge flags of ``pdserve serve``: API key, input bounds, slow clients, shutdown.

Unset flags keep RouterConfig's defaults (router/service.py), which the help repeats.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("pdserve")


def add_edge_args(p: argparse.ArgumentParser) -> None:
    """The router's edge: API key, input bounds, slow clients, shutdown. Unset flags keep
    RouterConfig's defaults (router/service.py), which the help repeats."""
    p.add_argument("--api-key", default=None, help="Bearer key (visible in ps: prefer --api-key-file or PDSERVE_API_KEY)")  # fmt: skip
    p.add_argument("--api-key-file", default=None, help="read the Bearer key from this file")
    p.add_argument("--max-body-bytes", type=int, default=None, help="413 for a request body above this (default 8 MiB)")  # fmt: skip
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="400 for prompt text (chat: all messages) above this many characters, before "
        "tokenizing (default: 32 x the context length)",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=None,
        help="abort a stream whose client accepts no data for this many seconds (default 30)",
    )
    p.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=None,
        help="on SIGTERM/SIGINT, seconds requests in flight get to finish before they are "
        "aborted (default 20)",
    )


def add_api_args(p: argparse.ArgumentParser) -> None:
    """OpenAI API behaviour of the served model."""
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json"],
        help="the model's tool-call format: parse tool_calls out of chat output and enforce "
        "tool_choice required/named in it (as vLLM's flag); unset refuses tools",
    )


def edge_config(args: argparse.Namespace) -> dict:
    """RouterConfig fields of the edge flags that were given."""
    given = {
        "max_body_bytes": args.max_body_bytes,
        "max_prompt_chars": args.max_prompt_chars,
        "stream_stall_timeout_s": args.stream_stall_timeout,
        "graceful_shutdown_s": args.graceful_shutdown_timeout,
        "tool_call_parser": getattr(args, "tool_call_parser", None),
    }
    return {k: v for k, v in given.items() if v is not None}


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """``--api-key-file``, else ``--api-key`` (with a warning: ps shows it), else the
    ``PDSERVE_API_KEY`` environment variable."""
    if args.api_key_file and args.api_key:
        raise ValueError("give --api-key-file or --api-key, not both")
    if args.api_key_file:
        try:
            key = open(args.api_key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}") from None  # fmt: skip
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key:
        logger.warning("--api-key is visible to every user of this host (ps, /proc); use --api-key-file or PDSERVE_API_KEY")  # fmt: skip
        return args.api_key
    return os.environ.get("PDSERVE_API_KEY") or None
