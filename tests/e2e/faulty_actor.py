"""A Ray worker actor with a test-only hook that kills its engine loop (no production
knob): the actor runs the real worker; ``kill_engine_loop`` makes its next step raise, as
a failed batch forward would, and returns once the loop is dead."""

from __future__ import annotations

import time

from router.launch.ray_launcher import RayWorkers, WorkerActor, WorkerSettings


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
        health = getattr(worker.loop, "health", None)  # absent before Health told the truth
        return health().reason if health else ""


def launch_faulty(settings: WorkerSettings, prefix: str, prefill: int, decode: int) -> RayWorkers:
    """Like ``RayWorkers.launch`` (restarted by Ray, one CPU each), with the hook above."""
    import ray

    workers = RayWorkers()
    cls = ray.remote(FaultyWorkerActor).options(max_restarts=-1, max_task_retries=0, num_cpus=1)
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            wid = f"{prefix}{role}-{i}"
            workers.actors[wid] = cls.remote(role, wid, settings.to_json(), None)
    return workers
