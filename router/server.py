"""Assemble and run a router: state, registry, policy, metrics, service, app, uvicorn.

Workers come from a *source*: a fixed list of gRPC addresses (standalone workers) or a
callable returning the current addresses (Ray actors, which move when restarted). The
router re-reads the source and polls every worker's Stats every ``poll_interval_s``.
With ``discover=True`` (a shared state in Redis) there is no source: workers register
and publish themselves, and the router discovers them from the state every
``poll_interval_s`` (router/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable

import uvicorn

from engine.config.router import RouterConfig
from engine.security import ClusterSecret
from engine.tokenizer import Tokenizer
from router.app import create_app
from router.metrics import Metrics
from router.policy import CostPolicy, RoutingPolicy
from router.service import RouterService
from router.state.base import ClusterState
from router.state.memory import MemoryClusterState
from router.state_calls import StateCalls
from router.workers import Registry

logger = logging.getLogger(__name__)

Source = Callable[[], Awaitable[list[str]]]


class Router:
    def __init__(
        self,
        config: RouterConfig,
        workers: list[str] | Source,
        *,
        state: ClusterState | None = None,
        policy: RoutingPolicy | None = None,
        poll_interval_s: float = 0.5,
        discover: bool = False,
        secret: ClusterSecret | None = None,
    ) -> None:
        self.discover = discover
        self.config = config
        self.state = state or MemoryClusterState()
        self.metrics = Metrics()
        self.io = StateCalls(self.state)
        self.registry = Registry(
            self.state, self.metrics, poll_interval_s, io=self.io, secret=secret
        )
        self.policy = policy or CostPolicy(
            config.local_prefill_tokens, overload_factor=config.prefill_overload_factor
        )
        self.service = RouterService(
            config,
            self.state,
            self.registry,
            self.policy,
            self.metrics,
            Tokenizer.from_dir(config.model),
        )
        self._source = workers if callable(workers) else _fixed(list(workers))
        self.poll_interval_s = poll_interval_s
        self.app = create_app(self.service, lifespan=self._lifespan)
        self.ready = threading.Event()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        await self.sync()
        task = asyncio.ensure_future(self._supervise())
        self.ready.set()
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.service.close()  # aborts still in flight reach the workers first
            await self.registry.close()
            self.io.close()

    async def sync(self) -> None:
        if self.discover:
            await self.registry.discover()
            return
        try:
            addresses = await self._source()
        except Exception as exc:
            logger.warning("cannot list workers: %r", exc)
            return
        await self.registry.sync(addresses)
        await self.registry.poll_once()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.sync()
            except Exception:
                logger.exception("worker supervision failed")

    def uvicorn_config(self, host: str, port: int) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            # Requests in flight get this long to finish, then are cancelled (aborting
            # them on the workers) instead of holding the shutdown forever.
            timeout_graceful_shutdown=self.config.graceful_shutdown_s,  # type: ignore[arg-type]
        )

    def serve(
        self,
        host: str,
        port: int,
        on_bound: Callable[[str, int], None] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """Serve HTTP in the foreground until interrupted (SIGINT/SIGTERM: graceful), on
        ``sock`` if already bound. ``on_bound(host, port)`` runs once it accepts."""
        server = uvicorn.Server(self.uvicorn_config(host, port))
        if on_bound is not None:
            threading.Thread(target=_report_bound, args=(server, on_bound), daemon=True).start()
        try:
            server.run(sockets=None if sock is None else [sock])
        except KeyboardInterrupt:  # Ctrl-C is a clean stop, as with uvicorn.run
            pass
        if not server.started:  # start-up failed (logged by uvicorn): its exit status
            raise SystemExit(3)

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> RouterThread:
        return RouterThread(self, host, port)


def _report_bound(server: uvicorn.Server, on_bound: Callable[[str, int], None]) -> None:
    while not server.started:
        if server.should_exit:
            return
        threading.Event().wait(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    on_bound(host, port)


def _fixed(addresses: list[str]) -> Source:
    async def source() -> list[str]:
        return addresses

    return source


class RouterThread:
    """A router serving HTTP on a background thread (tests, embedded use)."""

    def __init__(self, router: Router, host: str, port: int) -> None:
        self.router = router
        self.server = uvicorn.Server(router.uvicorn_config(host, port))
        self._thread = threading.Thread(target=self.server.run, name="router", daemon=True)
        self._thread.start()
        if not router.ready.wait(60):
            raise RuntimeError("router did not start within 60 s")
        while not self.server.started:
            threading.Event().wait(0.01)
        sock = self.server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
