"""Lockstep for an EP group: the leader broadcasts each step's ``SchedulerOutput``.

Leader (rank 0): ``schedule()`` → :func:`broadcast_step` → ``runner.execute`` (its home
sequences) → sample every rank's sequences. Follower: :func:`run_follower` loops
:func:`receive_step` → ``runner.execute`` (its home sequences, its slice of the experts;
it sends its sampling rows to the leader) until the leader sends ``stop``.

The wire format is JSON (no pickle): a length broadcast, then the UTF-8 bytes, over the
group's CPU (gloo) group. Besides the step, the message names the KV moves of
``engine/parallel/kv_relay.py``: ``kv_forward`` (rank → blocks the leader received by
transfer, sent point-to-point to that home rank right after the broadcast) and
``kv_pull`` (positions of prefill-only sequences homed on followers, which the followers
push to the leader after each layer for the KV hook).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from engine.parallel.ep import ExpertParallelGroup
from engine.parallel.kv_relay import KVCaches, Pull, pull_slots, push_hook, recv_blocks, send_blocks
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMessage:
    """One step as the followers receive it; ``step is None`` means stop."""

    step: SchedulerOutput | None
    kv_forward: dict[int, list[int]] = field(default_factory=dict)
    kv_pull: list[Pull] = field(default_factory=list)


def encode_step(msg: StepMessage) -> bytes:
    """JSON bytes for one step message."""
    so = msg.step
    if so is None:
        return b'{"stop": true}'
    body = {
        "sequences": [asdict(s) for s in so.sequences],
        "num_decodes": so.num_decodes,
        "finished": sorted(so.finished_request_ids),
        "kv_forward": {str(r): b for r, b in msg.kv_forward.items()},
        "kv_pull": [list(p) for p in msg.kv_pull],
    }
    return json.dumps(body).encode()


def decode_step(data: bytes) -> StepMessage:
    body = json.loads(data)
    if body.get("stop"):
        return StepMessage(None)
    seqs = []
    for s in body["sequences"]:
        params = SamplingParams.from_dict(s.pop("sampling_params"))
        s.pop("sampler_init", None)  # followers never sample: no sampler state
        seqs.append(
            ScheduledSequence(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()},
                sampling_params=params,
            )
        )
    so = SchedulerOutput(tuple(seqs), body["num_decodes"], frozenset(body["finished"]))
    forward = {int(r): b for r, b in body["kv_forward"].items()}
    return StepMessage(so, forward, [tuple(p) for p in body["kv_pull"]])


def broadcast_step(
    msg: StepMessage, ep: ExpertParallelGroup, kv_caches: KVCaches | None = None
) -> None:
    """Leader: send this step (``msg.step is None`` = stop), then forward its KV blocks."""
    data = torch.frombuffer(bytearray(encode_step(msg)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    dist.broadcast(data, 0, group=ep.cpu_group)
    if msg.step is not None and msg.kv_forward:
        send_blocks(kv_caches, msg.kv_forward, ep)


def receive_step(ep: ExpertParallelGroup, kv_caches: KVCaches) -> StepMessage:
    """Follower: the leader's next step, with this rank's forwarded KV written."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=ep.cpu_group)
    msg = decode_step(data.numpy().tobytes())
    if msg.step is not None:
        recv_blocks(kv_caches, msg.kv_forward.get(ep.rank, []), ep)
    return msg


def run_follower(runner, ep: ExpertParallelGroup) -> int:
    """Execute the leader's steps until it stops; returns the number of steps run."""
    steps = 0
    while (msg := receive_step(ep, runner.kv_caches)).step is not None:
        slots = pull_slots(msg.step, msg.kv_pull, ep.rank, runner.block_size)
        after = push_hook(runner.kv_caches, slots, ep) if slots.numel() else None
        runner.execute(msg.step, after)
        steps += 1
    logger.info("EP follower rank %d stopped after %d steps", ep.rank, steps)
    return steps
