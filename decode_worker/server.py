"""Start a worker of either role in this process: engine + engine thread + gRPC server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from decode_worker.runtime import GrpcServer, WorkerConfig
from engine.engine import LLMEngine
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

    def stop(self) -> None:
        self.server.stop()
        self.worker.close()


def start_worker(config: WorkerConfig) -> RunningWorker:
    """Load the model, start the engine thread and serve gRPC on ``config.host``."""
    from decode_worker.info import worker_info

    engine = LLMEngine(config.engine)
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
    server = GrpcServer(lambda s: add(servicer, s), config.host, config.port)
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
    return RunningWorker(config, address, info, worker, server)
