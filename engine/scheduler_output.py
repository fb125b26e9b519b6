"""Plain frozen dataclasses the scheduler hands the model runner: a step's whole input."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step."""

    request_id: str
    token_ids: tuple[int, ...]
    """Tokens to compute this step (a prefill chunk, or the last sampled token)."""
    start_pos: int
    """Position of ``token_ids[0]``; tokens before it are already in the cache."""
    block_ids: tuple[int, ...]
    """The request's whole block table."""
    sample: bool
    """Sample a next token after this step (false for a non-final prefill chunk)."""
    sampling_params: SamplingParams
    suppress_token_ids: tuple[int, ...] = ()
    """Tokens that must not be sampled (EOS/stop tokens before ``min_tokens``)."""
    stream_kv: bool = False
    """Call the engine's KV layer hook for this sequence's new tokens."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the runner needs for one step. Single-token sequences come first."""

    sequences: tuple[ScheduledSequence, ...]
    num_decodes: int
    finished_request_ids: frozenset[str] = frozenset()
    """Requests gone since the last step (the runner drops their sampler state)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass(frozen=True)
class SampleFailure:
    """A row that could not be sampled (non-finite logits, ...): its request fails alone."""

    reason: str


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None = None
    """Chosen token and top-n alternatives -> log-probability (when requested)."""
