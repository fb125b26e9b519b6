"""The prefill worker's commands (answered on its engine thread, prefill_worker/worker.py)
and the states of its job table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker.convert import prompt_logprobs_to_pb, token_to_pb
from engine.worker.errors import WorkerError
from kv_transfer import KVSender
from proto import worker_pb2 as pb

Reply = Callable[[pb.PrefillResponse | WorkerError], None]
"""Called once, on the engine thread, with the prefill's outcome."""


@dataclass(frozen=True)
class Prefill:
    """Prefill a prompt whose KV goes to ``sender`` (already opened to the decode worker's
    endpoint), or to the sender an ``AttachTicket`` brings (``sender`` None: the router
    reserves on the decode worker meanwhile); ``reply`` gets the outcome."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    sender: KVSender | None
    num_cached_blocks: int
    reply: Reply
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class AttachTicket:
    """The ticket of a ``Prefill`` sent without one, as a sender already opened to it; it
    may come before that ``Prefill``. Answers nothing."""

    request_id: str
    sender: KVSender
    num_cached_blocks: int


class JobState(str, Enum):
    """Where a job stands (the values are the ``Stats`` queue names)."""

    WAITING = "waiting"
    RUNNING = "running"
    SENDING = "sending"


@dataclass
class Job:
    request_id: str
    params: SamplingParams
    prompt_len: int
    reply: Reply
    deadline: float
    """Without a sender by then the job is dropped (its router went away)."""
    received_at: float
    sender: KVSender | None = None
    num_cached_blocks: int = 0
    state: JobState = JobState.WAITING
    first: RequestOutput | None = None
    """The sampled first token, once prefilled (the reply left then)."""
    replied: bool = False
    block_ids: tuple[int, ...] = ()
    """This worker's block table of the request (from the KV layer hook)."""
    computed: list[int] = field(default_factory=list)
    """Layers whose KV is complete here (final chunk computed), sent or not yet."""
    sent_layers: int = 0
    started_at: float | None = None
    """Its first scheduled step (the layer hook saw it)."""
    sampled_at: float = 0.0
    prompt: list[int] = field(default_factory=list)
    """Kept only when the prompt is scored (``params.prompt_logprobs``)."""


def prefill_response(job: Job, block_bytes: int, layers: int) -> pb.PrefillResponse:
    """The reply to ``job``'s Prefill once its first token is sampled: that token, its
    timings and the KV bytes its transfer moves (``block_bytes`` per block, layer and K or V)."""
    out, started = job.first, job.started_at or job.received_at
    lps = out.new_logprobs[0] if out.new_logprobs else None
    n = len(job.sender.ticket.block_ids) if job.sender is not None else 0
    return pb.PrefillResponse(
        first_token=token_to_pb(out.new_token_ids[0], lps, job.params.logprobs),
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        transfer_bytes=2 * n * block_bytes * layers,
        queue_seconds=started - job.received_at,
        compute_seconds=job.sampled_at - started,
        prompt_logprobs=prompt_logprobs_to_pb(
            job.prompt, out.prompt_logprobs, job.params.prompt_logprobs
        ),
    )
