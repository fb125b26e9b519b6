"""The decode worker's commands (answered on its engine thread, decode_worker/worker.py)
and the states of its request table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from engine.kv_cache.layout import KVLayout
from engine.sampling_params import SamplingParams
from engine.worker.sink import Sink
from kv_transfer import KVReceiver
from proto import worker_pb2 as pb


@dataclass(frozen=True)
class Reserve:
    """Reserve blocks for a prompt whose KV comes from a prefill worker; answers
    (ticket, cached blocks, cached tokens)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    transport: str
    lease_s: float
    prefill_tp: int = 1
    """TP ranks of the prefill worker that will send (decode_worker/tp.py plans parts)."""


@dataclass(frozen=True)
class Decode:
    """The router's first token for a reserved request: admit it once its KV is in."""

    request_id: str
    first_token: pb.Token
    sink: Sink
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Generate:
    """Prefill locally and decode (aggregated serving, fallbacks)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    sink: Sink


class DecodeState(str, Enum):
    """Where a request stands in the worker's table (the values are the ``Stats`` queue
    names; ``releasing`` is no queue: its blocks wait for the transport to let go)."""

    RESERVED = "reserved"
    RECEIVING = "receiving"
    READY = "ready"
    RUNNING = "running"
    RELEASING = "releasing"


@dataclass
class DecodeRequest:
    request_id: str
    params: SamplingParams
    state: DecodeState
    receiver: KVReceiver | None = None
    sink: Sink | None = None
    first_token: pb.Token | None = None
    num_cached_tokens: int = 0
    transfer_over: bool = False
    """Its transfer's ``TransferDone`` was handled: the transport holds no block of it."""
    kv_at: float = 0.0
    """When its transfer's SUCCESS was posted."""
    decode_at: float = 0.0
    """When its Decode call came."""
    report: pb.TransferReport | None = None
    """How its KV arrived, for the first chunk of its stream."""
    since: float = field(default_factory=time.monotonic)
    prompt: list[int] = field(default_factory=list)
    """Kept only when the prompt is scored (``params.prompt_logprobs``)."""


def transfer_report(req: DecodeRequest, lay: KVLayout) -> pb.TransferReport:
    """How the KV came in: the transport's timings, and the admission since both the
    KV and the Decode call were here (an event each: no polling interval on the path)."""
    t = req.receiver.timings
    nbytes = 2 * len(req.receiver.ticket.block_ids) * lay.block_bytes * lay.num_layers
    return pb.TransferReport(
        bytes=nbytes,
        seconds=t.seconds if t else 0.0,
        tail_seconds=t.tail_seconds if t else 0.0,
        admission_seconds=time.monotonic() - max(req.kv_at, req.decode_at),
    )
