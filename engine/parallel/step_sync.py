"""Lockstep for an EP group: the leader broadcasts each step's ``SchedulerOutput``.

Leader (rank 0): ``schedule()`` → :func:`broadcast_step` → ``runner.execute`` → sample.
Follower: :func:`run_follower` loops :func:`receive_step` → ``runner.execute`` (its own
replicated KV cache, its slice of the experts) until the leader sends ``stop``.

The wire format is JSON (no pickle): a length broadcast, then the UTF-8 bytes, over the
group's CPU (gloo) group. KV that reached the leader from elsewhere (a prefill worker's
transfer into a decode leader) travels with the step that first uses it: the message
names ``kv_blocks`` and one more broadcast carries those blocks' K/V for every layer,
which the followers write into their own caches before executing the step.
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


KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def encode_step(so: SchedulerOutput | None, kv_blocks: list[int] | None = None) -> bytes:
    """JSON bytes for one step; ``None`` means stop."""
    if so is None:
        return b'{"stop": true}'
    seqs = [asdict(s) for s in so.sequences]
    body = {
        "sequences": seqs,
        "num_decodes": so.num_decodes,
        "finished": sorted(so.finished_request_ids),
        "kv_blocks": list(kv_blocks or ()),
    }
    return json.dumps(body).encode()


def decode_step(data: bytes) -> tuple[SchedulerOutput | None, list[int]]:
    """``(step, kv_blocks)``; the step is ``None`` when the leader stops."""
    body = json.loads(data)
    if body.get("stop"):
        return None, []
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
    so = SchedulerOutput(tuple(seqs), body["num_decodes"], frozenset(body["finished"]))
    return so, body["kv_blocks"]


def broadcast_step(
    so: SchedulerOutput | None,
    ep: ExpertParallelGroup,
    kv_caches: KVCaches | None = None,
    kv_blocks: list[int] | None = None,
) -> None:
    """Leader: send this step (or ``None`` = stop), and ``kv_blocks`` of ``kv_caches``."""
    data = torch.frombuffer(bytearray(encode_step(so, kv_blocks)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    dist.broadcast(data, 0, group=ep.cpu_group)
    if so is not None and kv_blocks:
        dist.broadcast(_gather_blocks(kv_caches, kv_blocks), 0, group=ep.cpu_group)


def receive_step(ep: ExpertParallelGroup, kv_caches: KVCaches) -> SchedulerOutput | None:
    """Follower: the leader's next step (its forwarded KV written), or ``None`` = stop."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=ep.cpu_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=ep.cpu_group)
    so, kv_blocks = decode_step(data.numpy().tobytes())
    if so is not None and kv_blocks:
        ids = torch.tensor(kv_blocks, dtype=torch.int64)
        pages = torch.empty_like(_gather_blocks(kv_caches, kv_blocks))
        dist.broadcast(pages, 0, group=ep.cpu_group)
        for (k, v), (pk, pv) in zip(kv_caches, pages, strict=True):
            k.index_copy_(0, ids.to(k.device), pk.to(k.device))
            v.index_copy_(0, ids.to(v.device), pv.to(v.device))
    return so


def _gather_blocks(kv_caches: KVCaches, blocks: list[int]) -> torch.Tensor:
    """``[layers, 2, len(blocks), *block_shape]`` on the CPU (gloo sends CPU tensors)."""
    ids = torch.tensor(blocks, dtype=torch.int64, device=kv_caches[0][0].device)
    return torch.stack([torch.stack([k[ids], v[ids]]) for k, v in kv_caches]).cpu()


def run_follower(runner, ep: ExpertParallelGroup) -> int:
    """Execute the leader's steps until it stops; returns the number of steps run."""
    steps = 0
    while (so := receive_step(ep, runner.kv_caches)) is not None:
        runner.execute(so)
        steps += 1
    logger.info("EP follower rank %d stopped after %d steps", ep.rank, steps)
    return steps
