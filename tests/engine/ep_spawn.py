"""Run a function on 2 spawned processes joined as an EP group on 127.0.0.1.

The rendezvous store is bound here, in the parent, on a port the OS picks (port 0), and
held while the ranks run: no port is picked free and bound later by someone else. On
CPU the group is gloo; with ``device="cuda"`` each rank takes ``cuda:<rank>`` and expert
traffic goes over NCCL (``engine.parallel.ep.join_ep_group``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.ep import join_ep_group

TIMEOUT = timedelta(seconds=120)


def _entry(rank: int, size: int, port: int, device: str, fn, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=TIMEOUT)
    ep = join_ep_group(rank, size, None, device, timeout_s=TIMEOUT.total_seconds(), store=store)
    try:
        fn(ep, *args)
    finally:
        dist.destroy_process_group()


def spawn_ep(fn, *args, size: int = 2, device: str = "cpu") -> None:
    """``fn(ep, *args)`` on ``size`` ranks; raises if any rank fails."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)  # fmt: skip
    mp.spawn(_entry, args=(size, store.port, device, fn, args), nprocs=size, join=True)
    del store  # held until every rank has finished
