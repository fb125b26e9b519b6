"""A request's mutable state inside the engine, and what the engine hands back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_PREFILLED = "prefilled"
    """Prefill-only request: prompt computed, first token sampled, KV held for transfer."""
    FINISHED_ERROR = "error"
    """This request alone failed (e.g. its logits were not finite); ``Request.error`` says
    why. Its blocks are freed and the rest of the batch goes on."""

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "prefilled", "error")


@dataclass
class Request:
    """Owned by the scheduler; the runner never sees it (it gets a SchedulerOutput)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    prefill_only: bool = False
    """Stop after the prompt's first token and keep the KV blocks until released."""
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first schedule (for usage reports)."""
    num_preemptions: int = 0
    error: str | None = None
    """Why the request failed (status ``FINISHED_ERROR``)."""
    sampler_initialised: bool = False
    """The runner was handed this request's sampler state (``SamplerInit``)."""
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)
    """Logprobs of prompt tokens 1.. as computed so far (``params.prompt_logprobs``)."""

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (a shared list: do not mutate; use append_output)."""
        return self._all_token_ids

    def append_output(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    @property
    def prompt_logprobs_done(self) -> bool:
        return len(self.prompt_logprobs) >= self.num_prompt_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request: the tokens it gained, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    error: str | None = None
    """Set when the request failed alone (``finish_reason == "error"``): a clear reason."""
    prompt_logprobs: list[dict[int, float]] | None = None
    """With ``params.prompt_logprobs``, on the output carrying the first token: one entry
    per prompt token after the first (the first has no context to be scored in)."""
