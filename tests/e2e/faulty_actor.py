"""Ray worker actors with test-only hooks (no production knob): ``FaultyWorkerActor`` can
kill its engine loop (``kill_engine_loop`` makes its next step raise, as a failed batch
forward would, and returns once the loop is dead); ``SlowPrefillActor`` delays every
Prefill call (a gRPC interceptor from tests/faults.py)."""

from __future__ import annotations

import time

from engine.config import WorkerConfig
from engine.config.tree import to_json
from router.launch.ray_launcher import RayWorkers, WorkerActor
from router.launch.worker_main import start_worker
from tests.faults import DelayRpc


class FaultyWorkerActor(WorkerActor):
    def kill_engine_loop(self) -> str:
        worker = self.running.worker

        def boom():
            raise RuntimeError("injected by the test: the batch forward failed")

        worker.engine.step = boom
        worker.engine.has_unfinished_requests = lambda: True
        worker.loop.wake()
        deadline = time.monotonic() + 10
        while worker.loop.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        return worker.loop.health().reason


class SlowPrefillActor(WorkerActor):
    def __init__(self, role, worker_id, settings_json, placement_group=None, delay_s=0.0):
        self.delay_s = delay_s
        super().__init__(role, worker_id, settings_json, placement_group)

    def _start(self, config, ep):
        return start_worker(config, ep, interceptors=[DelayRpc("Prefill", self.delay_s)])


def launch_actors(
    actor, config: WorkerConfig, prefix: str, prefill: int, decode: int, *args
) -> RayWorkers:
    """Like ``RayWorkers.launch`` (restarted by Ray, one CPU each) with a test actor class;
    ``args`` follow the placement group in its constructor."""
    import ray

    workers = RayWorkers()
    cls = ray.remote(actor).options(max_restarts=-1, max_task_retries=0, num_cpus=1)
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            wid = f"{prefix}{role}-{i}"
            workers.actors[wid] = cls.remote(role, wid, to_json(config), None, *args)
    return workers


def launch_faulty(config: WorkerConfig, prefix: str, prefill: int, decode: int) -> RayWorkers:
    return launch_actors(FaultyWorkerActor, config, prefix, prefill, decode)
