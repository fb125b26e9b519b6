"""Per-request sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            errors.append(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not self.temperature >= 0.0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            errors.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if errors:
            raise ValueError("invalid sampling params: " + "; ".join(errors))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
