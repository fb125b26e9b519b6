"""Lockstep for a parallel replica: the leader broadcasts each step's ``SchedulerOutput``.

Leader (rank 0): ``schedule()`` -> :func:`broadcast_step` -> run the step -> sample.
Follower: :func:`receive_step` -> run the same step (its shard) until the leader sends
``stop`` (engine/parallel/driver.py loops it).

The wire format is JSON (no pickle): a length broadcast, then the UTF-8 bytes, over the
group's CPU (gloo) group. Besides the step the message carries what the followers' own
KV hooks need (``items``: the prefill-only sequences whose new K/V leave after each
layer) and, with expert parallelism, each sequence's home rank and the KV blocks the
leader forwards to a home rank (engine/parallel/ep_driver.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from engine.kv_handoff import LayerKV
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput


@dataclass(frozen=True)
class StepMessage:
    """One step as the followers receive it; ``step is None`` means stop."""

    step: SchedulerOutput | None
    items: list[LayerKV] = field(default_factory=list)
    """The KV layer hook's items this step (followers' KV hooks send their share)."""
    homes: dict[str, int] = field(default_factory=dict)
    """EP: the home rank of each scheduled sequence."""
    kv_forward: dict[int, list[int]] = field(default_factory=dict)
    """EP: rank -> blocks the leader sends it point to point right after the broadcast."""


IDLE = SchedulerOutput((), 0)


def encode_step(msg: StepMessage) -> bytes:
    """JSON bytes for one step message."""
    so = msg.step
    if so is None:
        return b'{"stop": true}'
    body = {
        "sequences": [asdict(s) for s in so.sequences],
        "num_decodes": so.num_decodes,
        "finished": sorted(so.finished_request_ids),
        "items": [asdict(i) for i in msg.items],
        "homes": msg.homes,
        "kv_forward": {str(r): b for r, b in msg.kv_forward.items()},
    }
    return json.dumps(body).encode()


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def decode_step(data: bytes) -> StepMessage:
    body = json.loads(data)
    if body.get("stop"):
        return StepMessage(None)
    seqs = []
    for s in body["sequences"]:
        params = SamplingParams.from_dict(s.pop("sampling_params"))
        s.pop("sampler_init", None)  # followers never sample: no sampler state
        seqs.append(ScheduledSequence(**_tuples(s), sampling_params=params))
    so = SchedulerOutput(tuple(seqs), body["num_decodes"], frozenset(body["finished"]))
    items = [LayerKV(**_tuples(i)) for i in body["items"]]
    forward = {int(r): b for r, b in body["kv_forward"].items()}
    return StepMessage(so, items, body["homes"], forward)


def broadcast_step(msg: StepMessage, group: dist.ProcessGroup | None) -> None:
    """Leader: send this step (``msg.step is None`` = stop) to every rank of ``group``."""
    data = torch.frombuffer(bytearray(encode_step(msg)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    dist.broadcast(data, 0, group=group)


def receive_step(group: dist.ProcessGroup | None) -> StepMessage:
    """Follower: the leader's next step."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group)
    return decode_step(data.numpy().tobytes())
