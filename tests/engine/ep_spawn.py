"""Run a function on 2 spawned processes joined by a gloo group on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.ep import ExpertParallelGroup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(ExpertParallelGroup(rank, size), *args)
    finally:
        dist.destroy_process_group()


def spawn_ep(fn, *args, size: int = 2) -> None:
    """``fn(ep, *args)`` on ``size`` ranks; raises if any rank fails."""
    mp.spawn(_entry, args=(size, _free_port(), fn, args), nprocs=size, join=True)
