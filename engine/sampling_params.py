"""Per-request sampling parameters.

``SamplingParams`` refuses, with a ``ValueError`` naming every bad field, its value and
its limit, whatever the engine, the batched sampler or worker.proto could not hold; the
router's request models (router/protocol.py) carry the same bounds, so the offline API,
the workers and the HTTP edge accept the same values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_TEMPERATURE = 0.01
"""Smallest non-zero temperature: below it ``logits / temperature`` overflows float32 for
ordinary logits (softmax turns inf into NaN). 0 means greedy."""
MAX_TEMPERATURE = 100.0
MAX_TOKEN_ID = 2**31 - 1
"""Token ids, ``top_k`` and token counts must fit the int32/uint32 fields of the proto and
of torch index tensors; vocabulary bounds are checked by the engine that knows its model."""
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20
"""Most top alternatives per token (as OpenAI's ``top_logprobs``)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """Suppress EOS and stop tokens until this many tokens were generated."""
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int | None = None
    """Keep the k most likely tokens (``None`` = all)."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches ``top_p``."""
    seed: int | None = None
    """Per-request seed; the same seed gives the same tokens."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Stop after generating any of these (the token is kept in the output)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token."""
    logprobs: int | None = None
    """Return the log-probabilities of this many top tokens per step (plus the chosen one)."""

    def __post_init__(self) -> None:
        errors = [e for e in (_check_counts(self), *_check_sampling(self)) if e]
        errors += _check_stop_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            errors.append(f"ignore_eos must be a bool, got {_shown(self.ignore_eos)}")
        if errors:
            raise ValueError("invalid sampling params: " + "; ".join(errors))
        # Plain Python numbers from here on (numpy ints, float-like ints): the proto and
        # torch take them as they are.
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else int(value))
        for name in ("temperature", "top_p"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value)


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a hostile value must not fill the error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_counts(p: SamplingParams) -> str | None:
    errors = []
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        errors.append(f"max_tokens must be an int >= 1, got {_shown(p.max_tokens)}")
    elif p.max_tokens > MAX_TOKEN_ID:
        errors.append(f"max_tokens must be <= {MAX_TOKEN_ID}, got {p.max_tokens}")
    most = p.max_tokens if not errors else MAX_TOKEN_ID
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= most:
        limit = f"max_tokens={most}" if not errors else str(most)
        errors.append(f"min_tokens must be in [0, {limit}], got {_shown(p.min_tokens)}")
    return "; ".join(errors) or None


def _check_sampling(p: SamplingParams) -> list[str | None]:
    t, top_p = p.temperature, p.top_p
    errors = [
        _optional_int("top_k", p.top_k, 1, MAX_TOKEN_ID),
        _optional_int("logprobs", p.logprobs, 0, MAX_LOGPROBS),
        _optional_int("seed", p.seed, 0, MAX_SEED),
    ]
    if not _is_real(t) or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        errors.append(
            f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
            f"got {_shown(t)}"
        )
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        errors.append(f"top_p must be in (0, 1], got {_shown(top_p)}")
    return errors


def _optional_int(name: str, value: object, lo: int, hi: int) -> str | None:
    if value is None or (_is_int(value) and lo <= value <= hi):
        return None
    return f"{name} must be in [{lo}, {hi}] or None, got {_shown(value)}"


def _check_stop_ids(ids: object) -> list[str]:
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        return [f"stop_token_ids must be a list of token ids, got {_shown(ids)}"]
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return [f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"]
    bad = [t for t in ids if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID]
    if bad:
        return [f"stop_token_ids must be ids in [0, {MAX_TOKEN_ID}], got {_shown(bad[0])}"]
    return []
