"""Per-request sampling parameters."""

from __future__ import annotations

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
        errors = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            errors.append(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        elif self.max_tokens > MAX_TOKEN_ID:
            errors.append(f"max_tokens must be <= {MAX_TOKEN_ID}, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            errors.append(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            errors.append(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {t}"
            )
        if self.top_k is not None and not 1 <= self.top_k <= MAX_TOKEN_ID:
            errors.append(f"top_k must be in [1, {MAX_TOKEN_ID}] or None, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            errors.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        errors += _check_stop_ids(self.stop_token_ids)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            errors.append(f"seed must be in [0, {MAX_SEED}] or None, got {self.seed}")
        if errors:
            raise ValueError("invalid sampling params: " + "; ".join(errors))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_stop_ids(ids) -> list[str]:
    ids = tuple(ids)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return [f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"]
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID]
    return [f"stop_token_ids must be ids in [0, {MAX_TOKEN_ID}], got {bad[0]}"] if bad else []
