"""A worker's gRPC server: its own asyncio loop thread, the cluster-secret interceptor
(engine/grpc_auth.py), and services assembled from parts.

A service (``DecodeService``, ``PrefillService`` of proto/worker.proto) is served from a
mapping of rpc name -> coroutine; :func:`service_handler` builds it from the proto's
descriptor and refuses a mapping that leaves an rpc out, so both roles share one
implementation of their common rpcs (engine/worker/service.py) instead of each carrying
a copy.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence

import grpc
from google.protobuf import message_factory

from engine.grpc_auth import server_interceptors
from engine.security import ClusterSecret
from proto import worker_pb2 as pb


def service_handler(service: str, impls: Mapping[str, Callable]) -> grpc.GenericRpcHandler:
    """The handler of ``service`` (a service of worker.proto) from its rpcs' coroutines
    (streaming rpcs: async generators)."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    names = {m.name for m in desc.methods}
    if names != set(impls):
        raise ValueError(
            f"{service} needs exactly the rpcs {sorted(names)}, got {sorted(impls)} "
            f"(missing {sorted(names - set(impls))}, unknown {sorted(set(impls) - names)})"
        )
    handlers = {}
    for m in desc.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        make = (
            grpc.unary_stream_rpc_method_handler
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[m.name] = make(
            impls[m.name],
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(desc.full_name, handlers)


class GrpcServer:
    """A ``grpc.aio`` server on its own asyncio loop thread (works in any process)."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        host: str,
        port: int,
        secret: ClusterSecret | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ):
        self._handlers = tuple(handlers)
        self._secret = secret
        self._interceptors = tuple(interceptors)
        self._bind = f"{host}:{port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self.address = ""

    def start(self) -> str:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        self.address = fut.result(timeout=30)
        return self.address

    async def _start(self) -> str:
        opts = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]
        # With a cluster secret every RPC must carry a valid token (engine/grpc_auth.py);
        # it runs first, so a call without one never reaches another interceptor.
        interceptors = [*server_interceptors(self._secret), *self._interceptors]
        self._server = grpc.aio.server(options=opts, interceptors=interceptors)
        self._server.add_generic_rpc_handlers(self._handlers)
        port = self._server.add_insecure_port(self._bind)
        if port == 0:
            raise OSError(f"cannot bind the gRPC server to {self._bind}")
        await self._server.start()
        host = self._bind.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self.loop)
            fut.result(timeout=grace + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
