"""Start a worker of either role in this process: engine + engine thread + gRPC server."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.engine import LLMEngine
from engine.parallel.ep import ExpertParallelGroup
from engine.worker.loop import GrpcServer, WorkerConfig
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass
class RunningWorker:
    """A started worker; ``info`` is what it answers to ``Info``."""

    config: WorkerConfig
    address: str
    info: pb.InfoResponse
    worker: object
    server: GrpcServer
    publisher: object | None = None
    """``router.state.publisher.WorkerPublisher`` with ``config.redis_url``."""

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()  # deregister before the port closes
        self.server.stop()
        self.worker.close()


_exit = os._exit
"""How a worker whose engine loop died ends its process (tests replace it)."""

EXIT_DELAY_S = 1.0
"""Time for the failed streams' errors to reach their callers before the process ends."""


def _exit_on_engine_failure(worker, name: str) -> None:
    """An exception the engine could not pin on one request ended its loop: fail every
    stream with a clear error and end the process non-zero, so its supervisor (Ray, or
    whatever runs ``pdserve worker``) restarts it rather than leaving it up but deaf.
    With EP the reason names the dead rank (a failed collective)."""

    def on_crash(exc: BaseException) -> None:
        if worker.engine.ep is not None:
            from engine.parallel.health import describe_failure

            dead = describe_failure(worker.engine.ep)
            why = f"expert-parallel group of {name} failed: {dead} ({exc}); the worker restarts"
        else:
            why = (
                f"the engine loop of {name} failed ({type(exc).__name__}: {exc}); "
                "the worker restarts"
            )
        worker.fail_all(why)
        logger.error("%s; exiting", why)
        # ``_exit`` is read now: a replacement installed by a test holds for this timer.
        threading.Timer(EXIT_DELAY_S, _exit, args=(1,)).start()

    worker.loop.on_crash = on_crash


def start_worker(
    config: WorkerConfig,
    ep: ExpertParallelGroup | None = None,
    on_refused: Callable[[str], None] | None = None,
) -> RunningWorker:
    """Load the model, start the engine thread and serve gRPC on ``config.host``.

    With ``config.redis_url`` the worker registers itself in the shared cluster state and
    publishes its load and prefix events (router/state/publisher.py); a KV layout the cluster
    refuses raises ``router.state.publisher.LayoutRefused`` (``on_refused``: a later refusal).

    With ``ep`` this process is the EP leader (rank 0); the followers run
    :func:`engine.parallel.step_sync.run_follower` on an engine of their own.
    """
    from engine.worker.info import worker_info

    engine = LLMEngine(config.engine, ep)
    if config.role == "decode":
        from decode_worker.service import DecodeServicer
        from decode_worker.worker import DecodeWorker
        from proto.worker_pb2_grpc import add_DecodeServiceServicer_to_server as add

        worker = DecodeWorker(engine, config)
        servicer = DecodeServicer(worker, "")
    else:
        from prefill_worker.service import PrefillServicer
        from prefill_worker.worker import PrefillWorker
        from proto.worker_pb2_grpc import add_PrefillServiceServicer_to_server as add

        worker = PrefillWorker(engine, config)
        servicer = PrefillServicer(worker, "")
    _exit_on_engine_failure(worker, config.name)
    server = GrpcServer(lambda s: add(servicer, s), config.host, config.port, config.secret)
    try:
        address = server.start()
    except BaseException:
        worker.close()
        raise
    servicer.address = address
    info = worker_info(engine, config, address)
    if config.role == "decode":
        info.kv_transports.extend(sorted(worker.endpoints))
    logger.info(
        "%s worker %s serving gRPC on %s (%d KV blocks, transports %s)",
        config.role,
        config.name,
        address,
        engine.layout.num_blocks,
        ",".join(config.kv_transports),
    )
    running = RunningWorker(config, address, info, worker, server)
    if config.redis_url:
        from router.state.publisher import start_publisher

        try:
            running.publisher = start_publisher(config, info, worker, on_refused)
        except BaseException:
            running.stop()
            raise
    return running
