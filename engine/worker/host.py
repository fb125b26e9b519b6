"""Host one worker of a registered role in this process: engine + role worker (with its
engine thread) + gRPC server, and the process exit when the engine cannot go on.

    start_role(config, role):  secret (read on this node) -> LLMEngine -> role.worker
        -> CommonService + role.service as one gRPC service -> bound -> Info

Launch (router/launch/worker_main.py) looks the role up in the registry and adds the
Redis publisher; this module knows no role.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.parallel.health import describe_failure
from engine.parallel.state import ParallelState
from engine.security import ENV_FILE, ClusterSecret, load_cluster_secret
from engine.worker.grpc_server import GrpcServer, service_handler
from engine.worker.info import default_host, worker_info
from engine.worker.roles import RoleWorker, WorkerRole
from engine.worker.service import CommonService
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)

_exit = os._exit
"""How a worker whose engine loop died ends its process (tests replace it)."""

EXIT_DELAY_S = 1.0
"""Time for the failed streams' errors to reach their callers before the process ends."""


@dataclass
class RunningWorker:
    """A started worker; ``info`` is what it answers to ``Info``."""

    config: WorkerConfig
    address: str
    info: pb.InfoResponse
    worker: RoleWorker
    server: GrpcServer
    before_stop: list[Callable[[], None]] = field(default_factory=list)
    """Run first by :meth:`stop` (launch: deregister from Redis before the port closes)."""

    def stop(self) -> None:
        for fn in self.before_stop:
            fn()
        self.server.stop()
        self.worker.close()


def worker_secret(config: WorkerConfig) -> ClusterSecret | None:
    """This node's cluster secret (``cluster_secret_file``, else the environment); raises
    if the router authenticates and there is none, rather than serving unauthenticated."""
    secret = load_cluster_secret(config.cluster_secret_file)
    if secret is None and config.cluster_auth:
        raise ValueError(
            f"the router authenticates with a cluster secret but the worker on "
            f"{socket.gethostname()} has none: mount it and set ${ENV_FILE} on every "
            "node (deploy/ray/start-*.sh and the Helm chart do), or pass "
            "--cluster-secret-file with a path that exists on every node"
        )
    return secret


def start_role(
    config: WorkerConfig,
    role: WorkerRole,
    parallel: ParallelState | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningWorker:
    """Load the model, start the engine thread and serve gRPC (see the module docstring).
    ``parallel``: this process is rank 0 of a parallel replica (its followers run
    elsewhere). ``interceptors`` run after the cluster-secret check on every call."""
    config = replace(config, host=config.host or default_host())
    if role.prepare is not None:
        config = role.prepare(config)
    secret = worker_secret(config)
    engine = LLMEngine(config.engine, parallel)
    worker = role.worker(engine, config, secret)
    _exit_on_engine_failure(worker, config.name)
    common, own = CommonService(worker), role.service(worker)
    handler = service_handler(role.grpc_service, {**common.methods(), **own.methods()})
    server = GrpcServer([handler], config.host, config.port, secret, interceptors)
    try:
        address = server.start()
    except BaseException:
        worker.close()
        raise
    common.address = address
    info = worker_info(engine, config, address, worker.kv_transports())
    logger.info(
        "%s worker %s serving gRPC on %s (%d KV blocks, transports %s)",
        config.role, config.name, address, engine.layout.num_blocks,
        ",".join(config.kv_transports),
    )  # fmt: skip
    return RunningWorker(config, address, info, worker, server)


def _exit_on_engine_failure(worker: RoleWorker, name: str) -> None:
    """An exception the engine could not pin on one request ended its loop: fail every
    stream with a clear error and end the process non-zero, so its supervisor (Ray, or
    whatever runs ``pdserve worker``) restarts it rather than leaving it up but deaf.
    In a parallel replica the reason names the dead rank (a failed collective)."""

    def on_crash(exc: BaseException) -> str | None:
        better = None  # the loop's own "the engine loop failed: ..." says enough
        parallel = worker.engine.parallel
        if parallel.kind != "single":
            kind = "tensor" if parallel.kind == "tp" else "expert"
            dead = describe_failure(parallel)
            why = better = f"{kind}-parallel group of {name} failed: {dead} ({exc}); the worker restarts"  # fmt: skip
        else:
            why = (
                f"the engine loop of {name} failed ({type(exc).__name__}: {exc}); "
                "the worker restarts"
            )
        worker.fail_all(why)
        kv = worker.engine.kv
        logger.error(
            "%s; exiting (%d of %d KV blocks free)", why, kv.num_free_blocks, kv.num_blocks
        )
        # ``_exit`` is read now: a replacement installed by a test holds for this timer.
        threading.Timer(EXIT_DELAY_S, _exit, args=(1,)).start()
        return better

    worker.loop.on_crash = on_crash
