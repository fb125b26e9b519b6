"""Starting an expert-parallel group: followers as Ray actors in the leader's placement
group (``start_ray_ep_group``), or as local processes for ``pdserve worker --ep-size N``
(``start_local_ep_group``). Either way rank 0 hosts the rendezvous store and joins last,
and the group records every rank's pid so a failed step can name the rank that died."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from engine.config import WorkerConfig
from engine.config.engine import resolve_device
from engine.config.tree import from_json, to_json
from router.launch.process import setup_worker_process

logger = logging.getLogger(__name__)


def start_ray_ep_group(config: WorkerConfig, placement_group: Any, host: str):
    """Leader side: start the followers in bundles 1.., join the group as rank 0."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.parallel.ep import ep_store, join_ep_group

    store = ep_store(host, config.engine.parallel.ep_size)
    init_method = f"tcp://{host}:{store.port}"
    device = resolve_device(config.engine.device)  # this node's
    cuda = device.startswith("cuda")
    followers = []
    for rank in range(1, config.engine.parallel.ep_size):
        strategy = PlacementGroupSchedulingStrategy(placement_group, rank)
        cls = ray.remote(EPFollowerActor).options(
            max_restarts=0,
            scheduling_strategy=strategy,
            **({"num_gpus": 1} if cuda else {"num_cpus": 1}),  # fmt: skip
        )
        followers.append(cls.remote(to_json(config), rank, init_method))
    ep = join_ep_group(0, config.engine.parallel.ep_size, None, device, store=store)
    pids = (os.getpid(), *ray.get([f.pid.remote() for f in followers]))
    logger.info(
        "EP group of %d ranks joined at %s (pids %s)",
        config.engine.parallel.ep_size,
        init_method,
        pids,
    )
    return replace(ep, rank_pids=pids), followers


def ep_follower_main(config_json: str, rank: int, init_method: str) -> None:
    """EP rank > 0 (a Ray actor's thread, or a process of ``pdserve worker --ep-size``):
    join the group, load this rank's experts, run the leader's steps until it stops or the
    group fails, then exit the process."""
    setup_worker_process()
    from engine.engine import LLMEngine
    from engine.parallel.ep import join_ep_group

    try:
        config = from_json(WorkerConfig, config_json)
        device = resolve_device(config.engine.device)
        ep = join_ep_group(rank, config.engine.parallel.ep_size, init_method, device)
        LLMEngine(replace(config.engine, device=device), ep).run_follower()
    except BaseException:
        logger.exception("EP rank %d lost its group", rank)
    os._exit(0)


def start_local_ep_group(config: WorkerConfig) -> Any:
    """``pdserve worker --ep-size N`` (no Ray): N-1 follower processes on this host; this
    process joins as the leader. ``None`` when ``ep_size`` is 1."""
    if config.engine.parallel.ep_size == 1:
        return None
    import multiprocessing as mp

    from engine.parallel.ep import ep_store, join_ep_group

    store = ep_store(config.host, config.engine.parallel.ep_size)
    init_method = f"tcp://{config.host}:{store.port}"
    ctx = mp.get_context("spawn")
    pids = [os.getpid()]
    for rank in range(1, config.engine.parallel.ep_size):
        args = (to_json(config), rank, init_method)
        proc = ctx.Process(target=ep_follower_main, args=args, daemon=True)
        proc.start()
        pids.append(proc.pid)
    device = resolve_device(config.engine.device)
    ep = join_ep_group(0, config.engine.parallel.ep_size, None, device, store=store)
    return replace(ep, rank_pids=tuple(pids))


class EPFollowerActor:
    """A Ray actor around :func:`ep_follower_main` (which runs on its own thread)."""

    def __init__(self, config_json: str, rank: int, init_method: str) -> None:
        import threading

        args = (config_json, rank, init_method)
        threading.Thread(target=ep_follower_main, args=args, daemon=True).start()

    def pid(self) -> int:
        return os.getpid()
