"""The prefill worker's command (answered on its engine thread, prefill_worker/worker.py)
and the states of its job table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from engine.kv_handoff import LayerKV
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker.errors import WorkerError
from kv_transfer import KVSender
from proto import worker_pb2 as pb

Reply = Callable[[pb.PrefillResponse | WorkerError], None]
"""Called once, on the engine thread, with the prefill's outcome."""


@dataclass(frozen=True)
class Prefill:
    """Prefill a prompt whose KV goes to ``sender`` (already opened to the decode worker's
    endpoint); ``reply`` gets the outcome."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    sender: KVSender
    num_cached_blocks: int
    reply: Reply


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
    sender: KVSender
    num_cached_blocks: int
    reply: Reply
    state: JobState = JobState.WAITING
    first: RequestOutput | None = None
    sent_layers: int = 0
    t_first_layer: float = 0.0
    held: tuple[int, LayerKV, tuple[torch.Tensor, torch.Tensor]] | None = None
    """The last layer's ``_send_layer`` arguments, sent once the first token is sampled
    (prefill_worker/worker.py's module docstring)."""
