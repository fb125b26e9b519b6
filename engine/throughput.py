"""Measured prefill throughput, for the router's predicted time to first token.

Each engine step that computes at least ``min_tokens`` prompt tokens updates an
exponentially weighted average of prompt tokens per second of step time. Decode rows in
the same step count against it, so the figure errs on the slow side.
"""

from __future__ import annotations

from engine.scheduler_output import SchedulerOutput


class PrefillRate:
    def __init__(self, alpha: float = 0.3, min_tokens: int = 16) -> None:
        self.alpha, self.min_tokens = alpha, min_tokens
        self.tokens_per_s = 0.0
        """0.0 until a prefill step was measured."""

    def observe(self, so: SchedulerOutput, seconds: float) -> None:
        tokens = sum(s.num_tokens for s in so.sequences[so.num_decodes :])
        if tokens < self.min_tokens or seconds <= 0:
            return
        rate = tokens / seconds
        old = self.tokens_per_s
        self.tokens_per_s = rate if old == 0.0 else old + self.alpha * (rate - old)
