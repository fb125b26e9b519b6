"""What the router runs: a request's job (prompt, sampling, stop strings), the outputs it
yields, one per step, and what running it needs of the router's service."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import RouterConfig
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from proto import worker_pb2 as pb
from router.metrics import Metrics
from router.policy import RouteDecision, RoutingPolicy
from router.state.base import ClusterState, WorkerRecord
from router.state_calls import StateCalls
from router.workers import Registry


@dataclass
class Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop: list[str]
    arrival: float = field(default_factory=time.monotonic)
    index: int = 0
    """Which choice of the request this job is (``n`` > 1)."""
    discard_output: bool = False
    """Score the prompt only (``echo`` with ``max_tokens=0``): the token generated to get
    there is not returned."""


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
    prompt_logprobs: list[pb.Token] | None = None
    """On the first output of a job scoring its prompt: tokens 1.. of the prompt."""


class RouterService(Protocol):
    """What a run needs of the router's service (router/service.py)."""

    config: RouterConfig
    state: ClusterState
    registry: Registry
    policy: RoutingPolicy
    metrics: Metrics
    tokenizer: Tokenizer

    io: StateCalls

    async def route(self, job: Job) -> RouteDecision: ...

    def transport(self, p: WorkerRecord, d: WorkerRecord) -> str: ...

    def background(self, coro) -> asyncio.Task: ...
