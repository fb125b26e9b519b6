"""Plain frozen dataclasses the scheduler hands the model runner: a step's whole input."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerInit:
    """What the sampler needs to set up a request's state (engine/sampler_state.py) the
    first time it samples: the prompt (repetition penalty) and the tokens it already
    generated (penalty counts, the grammar's position)."""

    prompt: tuple[int, ...] = ()
    output: tuple[int, ...] = ()


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
    sampler_init: SamplerInit | None = None
    """Set on the first sampling step of a request whose sampler keeps state."""
    prompt_logprobs: int | None = None
    """Return logprobs (with this many alternatives) of the prompt tokens this chunk
    predicts: ``prompt_targets``, predicted by the chunk's first positions."""
    prompt_targets: tuple[int, ...] = ()

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
class StepResult:
    """What the runner hands back for one step."""

    sampled: dict[str, SampledToken | SampleFailure]
    """A token (or the reason it failed) for every sequence with ``sample=True``."""
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    """Per request: logprobs of the ``prompt_targets`` this step computed, in order."""


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None = None
    """Chosen token and top-n alternatives -> log-probability (when requested)."""
