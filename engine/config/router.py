"""``RouterConfig``: the router's settings (the ``pdserve serve`` router flags)."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from engine.config.fields import flag, runtime
from engine.config.worker import LEASE_S

KvTransport = Literal["auto", "shm", "tcp", "ucx", "torch_dist"]
ReserveMode = Literal["overlap", "serial"]
ToolCallParser = Literal["hermes", "llama3_json"]
"""The tool-call formats router/tools/formats.py implements (its ``FORMATS`` keys)."""


@dataclass(frozen=True)
class RouterConfig:
    """Router settings (``pdserve serve`` flags)."""

    model: str = field(metadata=flag(None))
    """Checkpoint directory: the tokenizer and chat template come from it (--model)."""
    served_model_name: str | None = None
    """The model name clients send (default: the model directory's name)."""
    kv_transport: KvTransport = "auto"
    """KV backend between prefill and decode; auto = shm on one host, else tcp."""
    local_prefill_tokens: int = 0
    """Prefill on the decode worker when at most this many prompt tokens are uncached."""
    prefill_overload_factor: float = 8.0
    """Prefill on the decode worker when remote prefill's predicted TTFT exceeds this many
    times local prefill's (router/policy.py); 0 = never for that reason."""
    reserve_mode: ReserveMode = "overlap"
    """overlap: the prefill starts while the decode worker reserves its blocks, and the
    ticket follows it (the reservation leaves the time to first token); serial: reserve,
    then prefill with the ticket (bench.compare measures both)."""
    prefill_timeout_s: float = field(default=30.0, metadata=flag("--prefill-timeout"))
    """Seconds: give up on remote prefill (and fall back to local) after this long."""
    request_timeout_s: float = field(default=600.0, metadata=flag("--request-timeout"))
    """Seconds: abort a request on every worker after this long."""
    lease_s: float = field(default=LEASE_S, metadata=flag(None))
    """How long a decode worker keeps blocks reserved for a transfer."""
    max_inflight: int = 256
    """Requests in flight above which new ones get 429."""
    api_key: str | None = field(default=None, metadata=runtime("--api-key"))
    """Require "Authorization: Bearer KEY" on /v1 routes (visible in ps: prefer
    --api-key-file or $PDSERVE_API_KEY)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Request bodies above this many bytes get 413 before they are parsed."""
    max_prompt_chars: int | None = None
    """Prompt text (chat: all messages) above this many characters gets 400 before
    tokenizing (default: 32 x the context length, router/limits.py)."""
    stream_stall_timeout_s: float = field(default=30.0, metadata=flag("--stream-stall-timeout"))
    """Abort a stream whose client accepts no data for this many seconds (a client that
    never reads would otherwise keep its KV blocks until the request timeout)."""
    graceful_shutdown_s: float = field(default=20.0, metadata=flag("--graceful-shutdown-timeout"))
    """On SIGTERM/SIGINT, seconds requests in flight get to finish before they are
    aborted."""
    tool_call_parser: ToolCallParser | None = field(
        default=None, metadata=flag("--tool-call-parser")
    )
    """The model's tool-call format, as vLLM's flag: chat output is parsed into tool_calls
    and tool_choice required/named is enforced in it; unset refuses tools (other than
    with tool_choice none)."""

    def __post_init__(self) -> None:
        if self.served_model_name is None:  # resolved once, at construction
            object.__setattr__(self, "served_model_name", os.path.basename(self.model.rstrip("/")))
        if self.local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, got {self.local_prefill_tokens}")
        if self.prefill_overload_factor < 0:
            raise ValueError(
                f"prefill_overload_factor must be >= 0 (0 = off), got {self.prefill_overload_factor}"
            )
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        for name in ("stream_stall_timeout_s", "graceful_shutdown_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        parsers = typing.get_args(ToolCallParser)
        if self.tool_call_parser is not None and self.tool_call_parser not in parsers:
            raise ValueError(
                f"unknown tool_call_parser {self.tool_call_parser!r}; choose one of {list(parsers)}"
            )
