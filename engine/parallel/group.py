"""Joining a replica's process group: torch.distributed on a TCP store that rank 0 binds.

    rank 0:     store = group_store(host, size)      (port 0: the OS picks, no race)
                join_group(0, ..., store=store)
    rank r > 0: join_group(r, ..., init_method=f"tcp://{host}:{store.port}")

Collectives go over NCCL on CUDA and gloo on CPU; the per-step broadcast always over a
gloo group (it carries CPU bytes). With ``channel=True`` the leader also opens the side
channel of engine/parallel/channel.py and tells every follower where it is (through the
gloo group), and each follower connects to it before ``join_group`` returns.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.channel import RankHub, RankLink
from engine.parallel.state import ParallelState


def group_store(host: str, size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port of ``host`` (bound atomically)."""
    return dist.TCPStore(
        host, 0, size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def join_group(
    rank: int,
    tp_size: int,
    ep_size: int,
    init_method: str | None,
    device: str,
    store: dist.Store | None = None,
    timeout_s: float = 120.0,
    channel_host: str | None = None,
) -> ParallelState:
    """Join as ``rank``; ``channel_host``: the leader opens the side channel there."""
    cuda = str(device).startswith("cuda")
    size = tp_size * ep_size
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=None if store is not None else init_method,
        # init_method rendezvous prefixes its store with "default_pg"; match it.
        store=dist.PrefixStore("default_pg", store) if store is not None else None,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
    cpu = dist.new_group(backend="gloo") if cuda else None
    state = ParallelState(rank, tp_size, ep_size, None, cpu)
    if channel_host is None:
        return state
    return ParallelState(rank, tp_size, ep_size, None, cpu, (), _channel(state, channel_host))


def _channel(state: ParallelState, host: str) -> RankHub | RankLink:
    """The leader's hub, or this follower's link to it (address and token broadcast)."""
    hub = RankHub(host, state.size, secrets.token_hex(16)) if state.is_leader else None
    where = json.dumps({"address": hub.address, "token": hub.token}).encode() if hub else b""
    size = torch.tensor([len(where)], dtype=torch.int64)
    dist.broadcast(size, 0, group=state.control_group)
    data = torch.zeros(int(size.item()), dtype=torch.uint8)
    if hub is not None:
        data = torch.frombuffer(bytearray(where), dtype=torch.uint8)
    dist.broadcast(data, 0, group=state.control_group)
    if hub is not None:
        hub.wait_connected()
        return hub
    info = json.loads(data.numpy().tobytes())
    return RankLink(info["address"], state.rank, info["token"])
