"""Start a worker of either role in this process (a Ray actor, ``pdserve worker``, tests):
the role from the registry, then its Redis publisher when the config names a Redis.

    start_worker(config):  roles.install() -> engine/worker/host.start_role(config, role)
        -> with config.state.redis_url: register + publish (router/state/publisher.py)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from engine.config import WorkerConfig
from engine.parallel.state import ParallelState
from engine.worker.host import RunningWorker, start_role
from engine.worker.info import stats_response
from engine.worker.roles import RoleWorker, get_role
from router.launch import roles
from router.state.base import load_from_stats, record_from_info
from router.state.publisher import WorkerPublisher


def start_worker(
    config: WorkerConfig,
    parallel: ParallelState | None = None,
    on_refused: Callable[[str], None] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningWorker:
    """Load the model, start the engine thread and serve gRPC on ``config.host``.

    With ``config.state.redis_url`` the worker registers itself in the shared cluster
    state and publishes its load and prefix events; a KV layout the cluster refuses raises
    ``router.state.publisher.LayoutRefused`` (``on_refused``: a later refusal).

    With ``parallel`` this process is rank 0 of a TP or EP group; the followers run
    :meth:`engine.engine.LLMEngine.run_follower` on an engine of their own
    (router/launch/group_launch.py).
    """
    roles.install()
    running = start_role(config, get_role(config.role), parallel, interceptors)
    if config.state.redis_url:
        try:
            publisher = start_publisher(running, on_refused)
        except BaseException:
            running.stop()
            raise
        running.before_stop.append(publisher.stop)  # deregister before the port closes
    return running


def start_publisher(
    running: RunningWorker, on_refused: Callable[[str], None] | None = None
) -> WorkerPublisher:
    """Publish a started worker; ``LayoutRefused`` if the cluster refuses its layout."""
    worker = running.worker
    publisher = WorkerPublisher(
        running.config.state,
        record_from_info(running.info),
        _snapshot_source(worker),
        on_refused=on_refused,
        down=lambda: _down(worker),
    )
    publisher.start()
    return publisher


def _snapshot_source(worker: RoleWorker):
    """The publisher's view of the worker: the engine thread's snapshot and the block
    events (from now on the publisher is their one consumer)."""
    events = worker.loop.block_events
    events.publisher = True

    def snapshot() -> tuple:
        stored, evicted = events.take()
        return load_from_stats(stats_response(worker.loop.snapshot, {})), stored, evicted

    return snapshot


def _down(worker: RoleWorker) -> str | None:
    health = worker.loop.health()
    return None if health.serving else health.reason
