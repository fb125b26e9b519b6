"""Starting an expert-parallel group: followers as Ray actors in the leader's placement
group (``start_ray_ep_group``), or as local processes for ``pdserve worker --ep-size N``
(``start_local_ep_group``). Either way rank 0 hosts the rendezvous store and joins last,
and the group records every rank's pid so a failed step can name the rank that died."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from router.launch.process import setup_worker_process
from router.launch.settings import WorkerSettings

logger = logging.getLogger(__name__)


def start_ray_ep_group(settings: WorkerSettings, config, placement_group: Any, host: str):
    """Leader side: start the followers in bundles 1.., join the group as rank 0."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.parallel.ep import ep_store, join_ep_group

    store = ep_store(host, settings.ep_size)
    init_method = f"tcp://{host}:{store.port}"
    cuda = config.engine.device.startswith("cuda")
    followers = []
    for rank in range(1, settings.ep_size):
        strategy = PlacementGroupSchedulingStrategy(placement_group, rank)
        cls = ray.remote(EPFollowerActor).options(
            max_restarts=0,
            scheduling_strategy=strategy,
            **({"num_gpus": 1} if cuda else {"num_cpus": 1}),  # fmt: skip
        )
        followers.append(cls.remote(settings.to_json(), config.role, rank, init_method))
    ep = join_ep_group(0, settings.ep_size, None, config.engine.device, store=store)
    pids = (os.getpid(), *ray.get([f.pid.remote() for f in followers]))
    logger.info("EP group of %d ranks joined at %s (pids %s)", settings.ep_size, init_method, pids)
    return replace(ep, rank_pids=pids), followers


def ep_follower_main(settings_json: str, role: str, rank: int, init_method: str) -> None:
    """EP rank > 0 (a Ray actor's thread, or a process of ``pdserve worker --ep-size``):
    join the group, load this rank's experts, run the leader's steps until it stops or the
    group fails, then exit the process."""
    setup_worker_process()
    from engine.engine import LLMEngine
    from engine.parallel.ep import join_ep_group

    try:
        settings = WorkerSettings.from_json(settings_json)
        config = settings.worker_config(role, None, "127.0.0.1")
        ep = join_ep_group(rank, settings.ep_size, init_method, config.engine.device)
        LLMEngine(config.engine, ep).run_follower()
    except BaseException:
        logger.exception("EP rank %d lost its group", rank)
    os._exit(0)


def start_local_ep_group(settings: WorkerSettings, config) -> Any:
    """``pdserve worker --ep-size N`` (no Ray): N-1 follower processes on this host; this
    process joins as the leader. ``None`` when ``ep_size`` is 1."""
    if settings.ep_size == 1:
        return None
    import multiprocessing as mp

    from engine.parallel.ep import ep_store, join_ep_group

    store = ep_store(config.host, settings.ep_size)
    init_method = f"tcp://{config.host}:{store.port}"
    ctx = mp.get_context("spawn")
    pids = [os.getpid()]
    for rank in range(1, settings.ep_size):
        args = (settings.to_json(), config.role, rank, init_method)
        proc = ctx.Process(target=ep_follower_main, args=args, daemon=True)
        proc.start()
        pids.append(proc.pid)
    ep = join_ep_group(0, settings.ep_size, None, config.engine.device, store=store)
    return replace(ep, rank_pids=tuple(pids))


class EPFollowerActor:
    """A Ray actor around :func:`ep_follower_main` (which runs on its own thread)."""

    def __init__(self, settings_json: str, role: str, rank: int, init_method: str) -> None:
        import threading

        args = (settings_json, role, rank, init_method)
        threading.Thread(target=ep_follower_main, args=args, daemon=True).start()

    def pid(self) -> int:
        return os.getpid()
