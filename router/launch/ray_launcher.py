"""Workers as Ray actors: placed by Ray, restarted by Ray, found by the router.

Each actor starts a worker (engine thread + gRPC server bound to its node's address) in
its own process and answers ``info()`` with plain values. Its ``WorkerConfig`` travels
whole as JSON (engine/config/tree.py; secrets as file paths); all request traffic is gRPC
with protobuf. A dead actor is restarted (``max_restarts=-1``)
with a new port and epoch; the router's supervisor re-reads ``info()`` and re-registers.

    launch():  ray.remote(WorkerActor).options(num_gpus=1 | num_cpus=1, max_restarts=-1,
                                               resources={"<role>_gpu": 1} if advertised)
    addresses(): [actor.info()["address"] for live actors]  -> Router source

Tensor or expert parallelism (``tp_size`` or ``ep_size`` > 1): a worker is a placement
group of one bundle per rank (STRICT_PACK, one node; a GPU per bundle on GPU nodes). The
leader actor sits in bundle 0 and is what the router sees; in its ``__init__`` it binds
the rendezvous store, starts one ``TPFollowerActor`` / ``EPFollowerActor`` per other
bundle (owned by the leader, so they die with it) and joins the torch.distributed group
with them. A follower that dies fails the leader's next collective: the leader fails its
streams naming the rank and exits, Ray restarts it, and it starts a fresh group
(``router/launch/group_launch.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any

from engine.config import WorkerConfig
from engine.config.tree import from_json, to_json
from router.launch.process import setup_worker_process

logger = logging.getLogger(__name__)


class WorkerActor:
    """A worker process under Ray (wrapped with ``ray.remote`` in :func:`launch`)."""

    def __init__(
        self, role: str, worker_id: str, config_json: str, placement_group: Any = None
    ) -> None:
        setup_worker_process()
        import ray

        host = ray.util.get_node_ip_address()
        config = from_json(WorkerConfig, config_json)
        config = replace(config, role=role, worker_id=worker_id, host=config.host or host)
        from router.launch.group_launch import group_size, start_ray_group

        parallel, self.followers = None, []
        if group_size(config) > 1:
            parallel, self.followers = start_ray_group(config, placement_group, host)
        self.running = self._start(config, parallel)

    def _start(self, config, parallel):
        """Start the worker (a subclass may add gRPC interceptors, e.g. a test's faults)."""
        from router.launch.worker_main import start_worker

        return start_worker(config, parallel)

    def rank_pids(self) -> list[int]:
        """Process ids of the worker's ranks, leader first (one entry on a single rank)."""
        import ray

        return [os.getpid(), *ray.get([f.pid.remote() for f in self.followers])]

    ep_pids = rank_pids

    def info(self) -> dict[str, Any]:
        """Address, role, KV layout and capacity, as plain values."""
        from google.protobuf import json_format

        i = self.running.info
        return {
            "worker_id": i.worker_id,
            "role": i.role,
            "address": i.address,
            "epoch": i.epoch,
            "pid": i.pid,
            "num_blocks": i.num_blocks,
            "block_size": i.block_size,
            "max_model_len": i.max_model_len,
            "ep_size": i.ep_size or 1,
            "tp_size": i.tp_size or 1,
            "layout": json_format.MessageToDict(i.layout, preserving_proto_field_name=True),
        }


def start_ray(address: str | None, node_ip: str | None, num_cpus: int | None) -> None:
    """Join the cluster at ``address``, or start a local one on ``node_ip``."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray gives its raylet a fixed 30 s to register with the GCS; on an overloaded host
    # (a 2-core box with a dozen busy processes) that can pass, so a local start is tried
    # a second time before it fails.
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=num_cpus,
                _node_ip_address=node_ip,
                object_store_memory=512 * 1024 * 1024,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
            return
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            logger.warning("local Ray did not start in time (%s); trying once more", e)
            ray.shutdown()


def _placement(role: str) -> dict[str, Any]:
    """Ray options for one ``role`` worker: a GPU (a CPU without GPUs), plus one unit of the
    custom resource ``<role>_gpu`` when nodes advertise it (deploy/ray scripts, the Helm
    chart), so prefill and decode workers land on their own nodes."""
    import ray

    resources = ray.cluster_resources()
    options: dict[str, Any] = {"num_gpus": 1} if resources.get("GPU", 0) >= 1 else {"num_cpus": 1}
    if resources.get(f"{role}_gpu", 0) >= 1:
        options["resources"] = {f"{role}_gpu": 1}
    return options


class RayWorkers:
    """Actors launched on Ray and the addresses of their gRPC servers.

    With a ``namespace`` the workers are shared by every router that names it: each actor
    is detached and named by its worker id in that Ray namespace, a router finding one
    already there uses it, and a router that exits leaves them running for the others.
    """

    def __init__(self, namespace: str | None = None) -> None:
        self.actors: dict[str, Any] = {}
        self.namespace = namespace
        self.placement_groups: list[Any] = []

    def launch(self, role: str, count: int, config: WorkerConfig, prefix: str = "") -> None:
        """``count`` workers of ``role`` from ``config`` (each gets its id and node address)."""
        import ray

        options = {"max_restarts": -1, "max_task_retries": 0, **_placement(role)}
        for i in range(count):
            worker_id = f"{prefix}{role}-{i}"
            if self.namespace:
                options.update(name=worker_id, namespace=self.namespace, lifetime="detached", get_if_exists=True)  # fmt: skip
            p = config.engine.parallel
            pg = self._group_placement(options, p.tp_size * p.ep_size)
            cls = ray.remote(WorkerActor).options(**options)
            self.actors[worker_id] = cls.remote(role, worker_id, to_json(config), pg)

    def _group_placement(self, options: dict[str, Any], ranks: int) -> Any:
        """For TP or EP: a placement group of one bundle per rank (STRICT_PACK: one node);
        the leader takes bundle 0."""
        if ranks == 1:
            options.pop("scheduling_strategy", None)
            return None
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"GPU": 1} if "num_gpus" in options else {"CPU": 1}
        bundle.update(options.get("resources", {}))
        pg = placement_group([bundle] * ranks, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)
        self.placement_groups.append(pg)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        return pg

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
        """Block until every actor answers ``info()``; returns their infos. An actor that
        Ray is restarting is asked again until the deadline."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        infos = {}
        for wid, actor in self.actors.items():
            while wid not in infos:
                try:
                    left = max(deadline - time.monotonic(), 0.1)
                    infos[wid] = ray.get(actor.info.remote(), timeout=left)
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # its restart is under way: ask again
        return infos

    def info_sync(self, worker_id: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
        import ray

        try:
            return ray.get(self.actors[worker_id].info.remote(), timeout=timeout_s)
        except Exception:  # restarting or dead: the supervisor asks again later
            return None

    async def addresses(self) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await asyncio.gather(
            *(loop.run_in_executor(None, self.info_sync, wid) for wid in self.actors)
        )
        return [i["address"] for i in infos if i is not None]

    def kill(self, worker_id: str, restart: bool = True) -> None:
        import ray

        ray.kill(self.actors[worker_id], no_restart=not restart)

    def shutdown(self, disconnect: bool = False) -> None:
        """Kill every actor (shared ones stay); ``disconnect`` also leaves Ray."""
        import ray

        for actor in [] if self.namespace else self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
        if not self.namespace:
            from ray.util.placement_group import remove_placement_group

            for pg in self.placement_groups:
                try:
                    remove_placement_group(pg)
                except Exception:
                    pass
            self.placement_groups.clear()
        if disconnect and ray.is_initialized():
            ray.shutdown()
