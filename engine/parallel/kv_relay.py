"""Point-to-point KV moves inside an EP group (data-parallel attention).

A request's KV lives only on its home rank, but two things happen on the leader:

* **forward** (decode worker): KV that a prefill worker transferred lands in the leader's
  cache; with the step that first uses it, the leader sends those blocks to the request's
  home rank only (``dist.send``; home 0 needs nothing)::

      leader cache ──blocks of req (home r)──► rank r cache        before the step runs

* **pull** (prefill worker): the KV layer hook streams from the leader's cache, so after
  each layer every follower sends the new K/V slots of its prefill-only sequences to the
  leader, which writes them into its own cache before calling the hook::

      rank r: layer i done ──K/V[slots]──► leader: write slots, hook(i)

Both sides derive the same block/slot lists from the step message, so every send has its
matching receive. Transfers use the group's CPU (gloo) control group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from engine.kv_cache.layout import slot_mapping
from engine.parallel.ep import ExpertParallelGroup
from engine.scheduler_output import SchedulerOutput

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
Pull = tuple[str, int, int]
"""``(request_id, start_pos, end_pos)``: token positions whose K/V the leader needs."""


def gather_blocks(kv_caches: KVCaches, blocks: Sequence[int]) -> torch.Tensor:
    """``[layers, 2, len(blocks), *block_shape]`` on the CPU (gloo sends CPU tensors)."""
    ids = torch.tensor(list(blocks), dtype=torch.int64, device=kv_caches[0][0].device)
    return torch.stack([torch.stack([k[ids], v[ids]]) for k, v in kv_caches]).cpu()


def send_blocks(
    kv_caches: KVCaches, by_rank: dict[int, list[int]], ep: ExpertParallelGroup
) -> None:
    """Leader: send each follower rank its blocks (rank 0's entry, if any, is skipped)."""
    for rank, blocks in sorted(by_rank.items()):
        if rank != 0 and blocks:
            dist.send(gather_blocks(kv_caches, blocks), rank, group=ep.cpu_group)


def recv_blocks(kv_caches: KVCaches, blocks: Sequence[int], ep: ExpertParallelGroup) -> None:
    """Follower: receive ``blocks`` of every layer from the leader into ``kv_caches``."""
    if not blocks:
        return
    pages = torch.empty_like(gather_blocks(kv_caches, blocks))
    dist.recv(pages, 0, group=ep.cpu_group)
    ids = torch.tensor(list(blocks), dtype=torch.int64)
    for (k, v), (pk, pv) in zip(kv_caches, pages, strict=True):
        k.index_copy_(0, ids.to(k.device), pk.to(k.device))
        v.index_copy_(0, ids.to(v.device), pv.to(v.device))


def pull_slots(
    so: SchedulerOutput,
    pulls: Sequence[Pull],
    homes: dict[str, int],
    rank: int,
    block_size: int,
) -> torch.Tensor:
    """int64 cache slots of the pulls whose sequence is homed on ``rank``, in pull order."""
    seqs = {s.request_id: s for s in so.sequences if homes.get(s.request_id, 0) == rank}
    slots = [
        slot
        for rid, start, end in pulls
        if rid in seqs
        for slot in slot_mapping(seqs[rid].block_ids, start, end, block_size)
    ]
    return torch.tensor(slots, dtype=torch.int64)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, kv_heads, head_dim]


def push_hook(
    kv_caches: KVCaches, slots: torch.Tensor, ep: ExpertParallelGroup
) -> Callable[[int], None]:
    """Follower: after layer ``i``, send that layer's K/V at ``slots`` to the leader."""

    def push(layer: int) -> None:
        k, v = kv_caches[layer]
        idx = slots.to(k.device)
        dist.send(torch.stack([_flat(k)[idx], _flat(v)[idx]]).cpu(), 0, group=ep.cpu_group)

    return push


def pull_hook(
    kv_caches: KVCaches,
    slots_by_rank: dict[int, torch.Tensor],
    ep: ExpertParallelGroup,
    then: Callable[[int], None] | None,
) -> Callable[[int], None]:
    """Leader: after layer ``i``, receive each follower's slots, then call ``then(i)``."""

    def pull(layer: int) -> None:
        k, v = kv_caches[layer]
        for rank, slots in sorted(slots_by_rank.items()):
            pages = torch.empty(2, slots.numel(), *k.shape[2:], dtype=k.dtype)
            dist.recv(pages, rank, group=ep.cpu_group)
            idx = slots.to(k.device)
            _flat(k).index_copy_(0, idx, pages[0].to(k.device))
            _flat(v).index_copy_(0, idx, pages[1].to(v.device))
        if then is not None:
            then(layer)

    return pull
