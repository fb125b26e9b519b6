"""Lockstep for an EP group: the leader broadcasts each step's ``SchedulerOutput``.

Leader (rank 0): ``schedule()`` → :func:`broadcast_step` → ``runner.execute`` → sample.
Follower: :func:`run_follower` loops :func:`receive_step` → ``runner.execute`` (its own
replicated KV cache, its slice of the experts) until the leader sends ``stop``.

The wire format is JSON (no pickle): a length broadcast, then the UTF-8 bytes, over the
group's CPU (gloo) group.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import torch
import torch.distributed as dist

from engine.parallel.ep import ExpertParallelGroup
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput

logger = logging.getLogger(__name__)


def encode_step(so: SchedulerOutput | None) -> bytes:
    """JSON bytes for one step; ``None`` means stop."""
    if so is None:
        return b'{"stop": true}'
    seqs = [asdict(s) for s in so.sequences]
    body = {
        "sequences": seqs,
        "num_decodes": so.num_decodes,
        "finished": sorted(so.finished_request_ids),
    }
    return json.dumps(body).encode()


def decode_step(data: bytes) -> SchedulerOutput | None:
    body = json.loads(data)
    if body.get("stop"):
        return None
    seqs = []
    for s in body["sequences"]:
        params = s.pop("sampling_params")
        params["stop_token_ids"] = tuple(params["stop_token_ids"])
        seqs.append(
            ScheduledSequence(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()},
                sampling_params=SamplingParams(**params),
            )
        )
    return SchedulerOutput(tuple(seqs), body["num_decodes"], frozenset(body["finished"]))


def broadcast_step(so: SchedulerOutput | None, ep: ExpertParallelGroup) -> None:
    """Leader: send this step (or ``None`` = stop) to every follower."""
    data = torch.frombuffer(bytearray(encode_step(so)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    dist.broadcast(data, 0, group=ep.cpu_group)


def receive_step(ep: ExpertParallelGroup) -> SchedulerOutput | None:
    """Follower: the leader's next step, or ``None`` when the leader stops."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=ep.cpu_group)
    return decode_step(data.numpy().tobytes())


def run_follower(runner, ep: ExpertParallelGroup) -> int:
    """Execute the leader's steps until it stops; returns the number of steps run."""
    steps = 0
    while (so := receive_step(ep)) is not None:
        runner.execute(so)
        steps += 1
    logger.info("EP follower rank %d stopped after %d steps", ep.rank, steps)
    return steps
