"""Run a function on spawned processes joined as one tensor- or expert-parallel group on
127.0.0.1, and the leader/follower split every rank function of the TP and EP tests makes.

The rendezvous store is bound here, in the parent, on a port the OS picks (port 0), and
held while the ranks run: no port is picked free and bound later by someone else. On
CPU the group is gloo; with ``device="cuda"`` each rank takes ``cuda:<rank>`` and the
model's collectives (TP: ``engine.parallel.group.join_group``) or expert traffic (EP:
``engine.parallel.ep.join_ep_group``) go over NCCL, the step broadcast over gloo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.ep import join_ep_group
from engine.parallel.group import join_group

if TYPE_CHECKING:
    from engine import LLM

TIMEOUT = timedelta(seconds=120)
T = TypeVar("T")
# join(rank, size, device, store, timeout_s) -> the rank's group handle (passed to fn)
Join = Callable[[int, int, str, dist.TCPStore, float], Any]


def _entry(rank: int, size: int, port: int, device: str, join: Join, fn, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=TIMEOUT)
    group = join(rank, size, device, store, TIMEOUT.total_seconds())
    try:
        fn(group, *args)
    finally:
        dist.destroy_process_group()


def spawn_group(join: Join, fn, *args, size: int = 2, device: str = "cpu") -> None:
    """``fn(group, *args)`` on ``size`` ranks joined by ``join`` (a module-level function:
    the spawned ranks unpickle it); raises if any rank fails."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)  # fmt: skip
    spawn_args = (size, store.port, device, join, fn, args)
    mp.spawn(_entry, args=spawn_args, nprocs=size, join=True)
    del store  # held until every rank has finished


def _join_tp(rank: int, size: int, device: str, store: dist.TCPStore, timeout_s: float):
    return join_group(rank, size, 1, None, device, store=store, timeout_s=timeout_s)


def _join_ep(rank: int, size: int, device: str, store: dist.TCPStore, timeout_s: float):
    return join_ep_group(rank, size, None, device, timeout_s=timeout_s, store=store)


def spawn_tp(fn, *args, size: int = 2, device: str = "cpu") -> None:
    """``fn(parallel, *args)`` on ``size`` TP ranks; raises if any rank fails."""
    spawn_group(_join_tp, fn, *args, size=size, device=device)


def spawn_ep(fn, *args, size: int = 2, device: str = "cpu") -> None:
    """``fn(ep, *args)`` on ``size`` EP ranks; raises if any rank fails."""
    spawn_group(_join_ep, fn, *args, size=size, device=device)


def on_leader(llm: LLM, work: Callable[[LLM], T]) -> T | None:
    """``work(llm)`` on the group's leader, then its followers are released; a follower
    rank follows the leader's steps until then and returns None."""
    if not llm.engine.parallel.is_leader:
        llm.engine.run_follower()
        return None
    try:
        return work(llm)
    finally:
        llm.engine.stop_followers()


def save_on_leader(group, out_path: str, results: Any) -> None:
    """The leader writes ``results`` as JSON for the parent test to read."""
    if group.is_leader:
        with open(out_path, "w") as f:
            json.dump(results, f)
