"""Bounds on client input that depend on the served model (vocabulary, context length).

The static bounds (temperature, seed, counts that must fit the proto) are in the request
models (router/protocol.py), from the constants of ``engine/sampling_params.py``. What
needs the model is checked here, before any tokenization: every refusal is an
``ApiError`` 400 whose ``param`` is the field and whose message names the value, the
limit and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from router.protocol import ApiError

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 32
"""Default prompt character limit = this x max_model_len. Real tokenizers average 3-5
characters per token; 32 leaves room for long whitespace or code tokens while refusing a
prompt that cannot fit the context before it costs a tokenization."""


def model_vocab_size(model_dir: str) -> int | None:
    """``vocab_size`` from the checkpoint's config.json (logits width), if present."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def model_eos_ids(model_dir: str) -> tuple[int, ...]:
    """``eos_token_id`` (one or a list) from the checkpoint's config.json."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return ()
    eos = cfg.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in ids if isinstance(i, int))


@dataclass(frozen=True)
class EdgeLimits:
    """What the served model can take."""

    vocab_size: int
    """Token ids (prompt and stop ids) must be below this; top_k at most this."""
    max_prompt_chars: int | None
    """Characters of prompt text (all chat messages together); None = derived."""

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN * max_model_len

    def check_text(self, chars: int, max_model_len: int, param: str) -> None:
        limit = self.prompt_chars(max_model_len)
        if chars > limit:
            why = "--max-prompt-chars" if self.max_prompt_chars else (
                f"{CHARS_PER_TOKEN} x the context length {max_model_len}; "
                "the server's --max-prompt-chars sets it"
            )  # fmt: skip
            raise ApiError(
                400,
                f"{param} is {chars} characters; the limit is {limit} ({why}). "
                "Send a shorter prompt.",
                param=param,
                code="context_length_exceeded",
            )

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size}); "
                "send ids of this model's tokenizer",
                param=param,
            )

    def check_top_k(self, top_k: int | None) -> None:
        if top_k is not None and top_k > self.vocab_size:
            raise ApiError(
                400,
                f"top_k={top_k} exceeds the vocabulary size {self.vocab_size}; "
                f"use top_k <= {self.vocab_size}, or -1 for all tokens",
                param="top_k",
            )


def context_error(limit: int, n: int, max_tokens: int | None) -> ApiError:
    """The OpenAI context-length 400 for ``n`` prompt tokens and ``max_tokens``."""
    want = n + (max_tokens or 1)
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you "
        f"requested {want} tokens ({n} in the prompt, {want - n} for the completion). "
        "Please reduce the prompt or max_tokens.",
        param="max_tokens" if n < limit else "prompt",
        code="context_length_exceeded",
    )


def check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    if min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}; lower min_tokens "
            "or raise max_tokens",
            param="min_tokens",
        )
