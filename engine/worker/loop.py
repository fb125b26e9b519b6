"""What both worker kinds share: config, the engine thread, output sinks, the gRPC server.

The engine is single-threaded. :class:`EngineLoop` owns it on one thread::

    loop thread:  [lock: housekeeping() -> engine.step() -> on_outputs(outs)] -> repeat
    gRPC handlers and kv_transfer threads:  with loop.lock: engine.<call>(); loop.wake()

so every engine call, from any thread, happens under ``loop.lock`` (an ``RLock``: a
kv_transfer callback may run synchronously inside a call that already holds it).

Failures: what one request causes (its sampling row, its stop checks, its output
handling) fails that request only; the workers catch it per request. Anything that still
escapes a loop iteration (the batch's model forward) ends the loop: ``on_crash`` fails
every stream and ends the process (router/launch/worker_main.py), so Ray or the supervisor
restarts it. :meth:`EngineLoop.health` is the loop's real state, read without the lock
(a stalled step holds it): alive, and no iteration (housekeeping + step) has run longer
than ``stall_timeout_s``; waiting idle for work is never a stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.grpc_auth import server_interceptors
from engine.request import RequestOutput
from engine.security import ClusterSecret

if TYPE_CHECKING:
    from router.state.redis_conn import RedisOptions

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: its role, engine and where it listens."""

    role: Role
    engine: EngineConfig
    host: str = "127.0.0.1"
    """Interface for the gRPC server and the KV endpoints (the node's address)."""
    port: int = 0
    """gRPC port; 0 picks a free one."""
    kv_transports: tuple[str, ...] = ("tcp",)
    """Decode: a KV endpoint per backend. Prefill: the backends it may send with."""
    worker_id: str | None = None
    """Name in logs and metrics; default ``<role>-<pid>``."""
    lease_s: float = 30.0
    """Decode: how long a prefilled request may wait for its Decode call."""
    fault_delay_s: float = 0.0
    """Prefill, tests only: sleep this long before each prefill (fault injection)."""
    extra: dict[str, str] = field(default_factory=dict)
    """kv_transfer plane options (TransferConfig.plane)."""
    redis_url: str | None = None
    """Register in and publish load/prefix events to this shared cluster state."""
    heartbeat_ttl_s: float = 3.0
    """With ``redis_url``: routers drop this worker when silent this long."""
    secret: ClusterSecret | None = None
    """The cluster secret: every gRPC call must prove it (engine/grpc_auth.py), and the KV
    plane gets it as ``TransferConfig.secret``; ``None`` = unauthenticated (a laptop)."""
    redis: RedisOptions | None = None
    """With ``redis_url``: password and TLS files for the shared state (router/redis_conn)."""
    stall_timeout_s: float = 60.0
    """Health reports the engine loop stalled (routers stop sending it requests) once one
    loop iteration has run this long; set it above the slowest step (a first CUDA step
    compiling kernels, a long prefill chunk)."""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        if not self.kv_transports:
            raise ValueError("kv_transports is empty; pass at least one, e.g. --kv-transport tcp")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.host in ("0.0.0.0", "::", ""):
            logger.warning("worker %s binds every interface (%r)", self.role, self.host)

    @property
    def name(self) -> str:
        return self.worker_id or f"{self.role}-{os.getpid()}"


@dataclass(frozen=True)
class LoopHealth:
    """What ``Health`` answers (proto ``HealthResponse``)."""

    serving: bool
    """The loop runs and is not stalled: route requests here."""
    loop_alive: bool
    seconds_since_step: float
    """How long the current iteration has run (0 while the loop idles waiting for work)."""
    has_work: bool
    """Requests are waiting or running in the engine."""
    reason: str = ""
    """Why not serving (empty while serving)."""


class EngineLoop:
    """Runs ``engine.step()`` on a dedicated thread; see the module docstring."""

    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        housekeeping: Callable[[], bool],
        name: str,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._on_outputs = on_outputs
        self._housekeeping = housekeeping
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self.stall_timeout_s = stall_timeout_s
        self.alive = False
        self.num_steps = 0
        self.failure: str | None = None
        """Why the loop ended, when a step raised."""
        self._progress = time.monotonic()
        self._polling = False
        self._idle = False
        self.on_crash: Callable[[BaseException], None] | None = None
        """Called on the engine thread if an iteration raises (server.py: fail the streams
        and end the process)."""

    def start(self) -> None:
        self.alive = True
        self._progress = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def health(self) -> LoopHealth:
        """The loop's real state; never takes the lock."""
        since = 0.0 if self._idle else time.monotonic() - self._progress
        has_work = self.engine.scheduler.has_work
        if not (self.alive and self._thread.is_alive()):
            why = self.failure or "the engine loop is not running"
            return LoopHealth(False, False, since, has_work, why)
        if since > self.stall_timeout_s:
            why = (
                f"the engine loop has not completed a step for {since:.1f}s "
                f"(stall bound {self.stall_timeout_s:g}s)"
            )
            return LoopHealth(False, True, since, has_work, why)
        return LoopHealth(True, True, since, has_work)

    def check_serving(self) -> None:
        """Refuse new work (``UNAVAILABLE``: the router routes it elsewhere) unless the
        loop serves: a dead loop would never run it, a stalled one holds the lock."""
        health = self.health()
        if not health.serving:
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, health.reason)

    @contextlib.contextmanager
    def hold(self, timeout_s: float = 2.0) -> Iterator[None]:
        """The lock for a read that must not wait on a stalled step (``Stats``): after
        ``timeout_s`` it answers UNAVAILABLE instead of tying up a gRPC thread."""
        if not self.lock.acquire(timeout=timeout_s):
            raise WorkerError(
                grpc.StatusCode.UNAVAILABLE,
                f"the engine loop held its lock for over {timeout_s:g}s (a step is stuck)",
            )
        try:
            yield
        finally:
            self.lock.release()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                busy = self._iterate()
                self._progress = time.monotonic()
                if not busy:
                    # Transfers in flight are polled; otherwise sleep until woken. Waiting
                    # is progress: only time inside an iteration can be a stall.
                    self._idle = True
                    self._wake.wait(0.002 if self._polling else 1.0)
                    self._progress, self._idle = time.monotonic(), False
        except BaseException as exc:
            logger.exception("engine loop crashed")
            self.failure = f"the engine loop failed: {type(exc).__name__}: {exc}"
            self.alive = False
            if self.on_crash is not None:
                self.on_crash(exc)
        finally:
            self.alive = False

    def _iterate(self) -> bool:
        """One iteration under the lock; returns whether the engine had work."""
        with self.lock:
            self._polling = self._housekeeping()
            busy = self.engine.has_unfinished_requests()
            if busy:
                self._on_outputs(self.engine.step())
                self.num_steps += 1
            elif self.engine.ep is not None:
                self.engine.heartbeat()  # EP followers time out without steps
        return busy


class Sink:
    """Hands items from the engine thread to one asyncio consumer."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        """Thread-safe; ``item`` may be an exception, which the consumer raises."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Any:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class WorkerError(Exception):
    """A request-level failure with the gRPC status the servicer should return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class GrpcServer:
    """A ``grpc.aio`` server on its own asyncio loop thread (works in any process)."""

    def __init__(
        self,
        register: Callable[[grpc.aio.Server], None],
        host: str,
        port: int,
        secret: ClusterSecret | None = None,
    ):
        self._register = register
        self._secret = secret
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
        # With a cluster secret every RPC must carry a valid token (engine/grpc_auth.py).
        self._server = grpc.aio.server(options=opts, interceptors=server_interceptors(self._secret))
        self._register(self._server)
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


def expert_stats(engine: LLMEngine) -> dict[str, Any]:
    """StatsResponse fields for an MoE engine's expert load (empty for dense models)."""
    load = engine.expert_load()
    if load is None:
        return {}
    return {"expert_tokens": load.tokens_per_expert, "ep_size": len(load.tokens_per_rank)}


def default_host() -> str:
    """This node's address for internal ports (never 0.0.0.0)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
