"""Starting a parallel replica's ranks: followers as Ray actors in the leader's placement
group (:func:`start_ray_group`), or as local processes for ``pdserve worker --tp-size N``
/ ``--ep-size N`` (:func:`start_local_group`). Either way rank 0 hosts the rendezvous
store and joins last, and the group records every rank's pid so a failed step can name
the rank that died. A tensor-parallel group also opens its side channel
(engine/parallel/channel.py), and each follower runs its role's part
(``WorkerRole.follower``: its own KV transfers) beside the leader's steps."""

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


def group_size(config: WorkerConfig) -> int:
    p = config.engine.parallel
    return p.tp_size * p.ep_size


def rank_device(config: WorkerConfig, rank: int) -> str:
    """This rank's device: ``cuda:<rank>`` when one process sees every GPU of the group
    (``pdserve worker`` on a multi-GPU node); under Ray each rank sees its own GPU only."""
    device = resolve_device(config.engine.device)
    if device != "cuda":
        return device
    import torch

    if torch.cuda.device_count() >= group_size(config):
        torch.cuda.set_device(rank)
        return f"cuda:{rank}"
    return device


def _join(config: WorkerConfig, rank: int, device: str, init_method=None, store=None):
    from engine.parallel.group import join_group

    p = config.engine.parallel
    channel = config.host if p.tp_size > 1 else None  # TP ranks transfer their own KV
    return join_group(rank, p.tp_size, p.ep_size, init_method, device, store, channel_host=channel)


def start_ray_group(config: WorkerConfig, placement_group: Any, host: str):
    """Leader side: start the followers in bundles 1.., join the group as rank 0."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.parallel.group import group_store

    size = group_size(config)
    store = group_store(host, size)
    init_method = f"tcp://{host}:{store.port}"
    device = resolve_device(config.engine.device)  # this node's
    cls = TPFollowerActor if config.engine.parallel.tp_size > 1 else EPFollowerActor
    followers = []
    for rank in range(1, size):
        strategy = PlacementGroupSchedulingStrategy(placement_group, rank)
        actor = ray.remote(cls).options(
            max_restarts=0,
            scheduling_strategy=strategy,
            **({"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": 1}),  # fmt: skip
        )
        followers.append(actor.remote(to_json(config), rank, init_method))
    parallel = _join(config, 0, device, store=store)
    pids = (os.getpid(), *ray.get([f.pid.remote() for f in followers]))
    logger.info("%s group of %d ranks joined at %s (pids %s)", parallel.kind.upper(), size, init_method, pids)  # fmt: skip
    return replace(parallel, rank_pids=pids), followers


def follower_main(config_json: str, rank: int, init_method: str) -> None:
    """Rank > 0 (a Ray actor's thread, or a process of ``pdserve worker``): join the group,
    load this rank's shard, run the leader's steps (and, with TP, its role's KV transfers)
    until it stops or the group fails, then exit the process."""
    setup_worker_process()
    from engine.engine import LLMEngine

    try:
        config = from_json(WorkerConfig, config_json)
        device = rank_device(config, rank)
        parallel = _join(config, rank, device, init_method=init_method)
        engine = LLMEngine(replace(config.engine, device=device), parallel)
        engine.run_follower(_role_follower(engine, config))
    except BaseException:
        logger.exception("rank %d lost its group", rank)
    os._exit(0)


def _role_follower(engine, config: WorkerConfig):
    if engine.tp_size == 1:
        return None  # EP: the leader moves every KV page (engine/parallel/kv_relay.py)
    from engine.worker.host import worker_secret
    from engine.worker.roles import get_role
    from router.launch import roles

    roles.install()
    return get_role(config.role).follower(engine, config, worker_secret(config))


def start_local_group(config: WorkerConfig) -> Any:
    """``pdserve worker --tp-size N`` or ``--ep-size N`` (no Ray): N-1 follower processes
    on this host; this process joins as the leader. ``None`` for a single rank."""
    size = group_size(config)
    if size == 1:
        return None
    import multiprocessing as mp

    from engine.parallel.group import group_store

    store = group_store(config.host, size)
    init_method = f"tcp://{config.host}:{store.port}"
    ctx = mp.get_context("spawn")
    pids = [os.getpid()]
    for rank in range(1, size):
        args = (to_json(config), rank, init_method)
        proc = ctx.Process(target=follower_main, args=args, daemon=True)
        proc.start()
        pids.append(proc.pid)
    parallel = _join(config, 0, rank_device(config, 0), store=store)
    return replace(parallel, rank_pids=tuple(pids))


class EPFollowerActor:
    """A Ray actor around :func:`follower_main` (which runs on its own thread)."""

    def __init__(self, config_json: str, rank: int, init_method: str) -> None:
        import threading

        args = (config_json, rank, init_method)
        threading.Thread(target=follower_main, args=args, daemon=True).start()

    def pid(self) -> int:
        return os.getpid()


class TPFollowerActor(EPFollowerActor):
    """The same, for a tensor-parallel rank (its own name in ``ray list actors``)."""
