"""What the router runs: a request's job (prompt, sampling, stop strings) and the outputs
it yields, one per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb


@dataclass
class Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Output:
    """New text and tokens of one step; the last one has ``finish_reason`` and usage."""

    text: str
    token_ids: list[int]
    tokens: list[pb.Token]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
