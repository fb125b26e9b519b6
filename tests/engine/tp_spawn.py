"""Run a function on spawned processes joined as one tensor-parallel group on 127.0.0.1.

The rendezvous store is bound here, in the parent, on a port the OS picks (port 0), and
held while the ranks run. On CPU the group is gloo; with ``device="cuda"`` each rank takes
``cuda:<rank>`` and the model's collectives go over NCCL (the step broadcast over gloo;
``engine.parallel.group.join_group``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.group import join_group

TIMEOUT = timedelta(seconds=120)


def _entry(rank: int, size: int, port: int, device: str, fn, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=TIMEOUT)
    timeout = TIMEOUT.total_seconds()
    parallel = join_group(rank, size, 1, None, device, store=store, timeout_s=timeout)
    try:
        fn(parallel, *args)
    finally:
        dist.destroy_process_group()


def spawn_tp(fn, *args, size: int = 2, device: str = "cpu") -> None:
    """``fn(parallel, *args)`` on ``size`` TP ranks; raises if any rank fails."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)  # fmt: skip
    mp.spawn(_entry, args=(size, store.port, device, fn, args), nprocs=size, join=True)
    del store  # held until every rank has finished
