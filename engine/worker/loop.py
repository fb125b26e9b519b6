"""``EngineLoop``: the one thread that owns a worker's engine and its request tables.

Other threads never call the engine (the one object of it they use is its thread-safe
grammar cache, ``engine.grammars``: engine/worker/service.py says why). gRPC handlers
``submit`` typed commands (answered through a ``concurrent.futures.Future``) and
transport threads ``post`` events; the engine thread drains its queue before every step::

    engine thread:  drain queue -> handler(command) per item (dispatch by type)
                       -> publish snapshot -> resolve the commands' futures
                    -> housekeeping() -> engine.step() -> on_outputs(outs)
                       -> publish snapshot -> repeat
    idle:           block on the queue (any command or event wakes it; at least every
                    ``IDLE_WAKE_S`` for timers and the followers' heartbeat)

A command's future resolves only after the snapshot that includes its effect, so a
``Stats`` read after a ``Reserve`` returned sees the reservation.

Failures: a handler that raises fails its own command (``WorkerError`` keeps its status,
``ValueError`` is INVALID_ARGUMENT, anything else INTERNAL and logged); the roles catch
what one request's step output causes. Anything that still escapes an iteration (the
batch's model forward) ends the loop: pending commands fail with UNAVAILABLE and
``on_crash`` fails every stream and ends the process (engine/worker/host.py), so Ray or
the supervisor restarts it. :meth:`health` is the loop's real state: alive, and no
iteration has run longer than ``stall_timeout_s``; waiting idle is never a stall.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from engine.engine import LLMEngine
from engine.request import RequestOutput
from engine.worker.errors import WorkerError
from engine.worker.snapshot import BlockEvents, LoadSnapshot, RoleLoad, take_snapshot

logger = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0
"""An idle loop wakes at least this often: lease timers, the followers' heartbeat."""


class LoopRole(Protocol):
    """What a role worker gives its loop; every method runs on the engine thread."""

    def handlers(self) -> Mapping[type, Callable[[Any], Any]]:
        """Command / event type -> handler (its return value answers a command)."""

    def housekeeping(self, now: float) -> None:
        """Timers (leases) before each step."""

    def on_outputs(self, outs: list[RequestOutput]) -> None:
        """One step's outputs."""

    def load(self) -> RoleLoad:
        """The role's tables, for the snapshot."""


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
    """See the module docstring."""

    def __init__(self, engine: LLMEngine, name: str, stall_timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.block_events = BlockEvents()
        self.num_steps = 0
        self.failure: str | None = None
        """Why the loop ended, when an iteration raised."""
        self.on_crash: Callable[[BaseException], str | None] | None = None
        """Called on the engine thread if an iteration raises (host.py: fail the streams
        and end the process); a string it returns is the failure's better name (with EP,
        the rank that died), which pending commands and ``Health`` then report."""
        self._queue: queue.SimpleQueue[tuple[Any, concurrent.futures.Future | None]]
        self._queue = queue.SimpleQueue()
        self._role: LoopRole | None = None
        self._handlers: Mapping[type, Callable[[Any], Any]] = {}
        self._moe = engine.expert_load() is not None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._stop = threading.Event()
        self.alive = False
        self._progress = time.monotonic()
        self._idle = False
        self.snapshot: LoadSnapshot | None = None
        """The latest published load (``None`` until the loop starts)."""

    # -- any thread -----------------------------------------------------------------------

    def start(self, role: LoopRole) -> None:
        self._role, self._handlers = role, dict(role.handlers())
        self.snapshot = take_snapshot(self.engine, role.load(), self._moe)
        self.alive = True
        self._progress = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put((None, None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._fail_pending("the worker is stopping")

    def submit(self, command: Any) -> concurrent.futures.Future:
        """Queue ``command`` for the engine thread; the future holds its handler's result
        (or its error). Fails at once with UNAVAILABLE once the loop has ended."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((command, future))
        if not self.alive:  # ended meanwhile: nothing will drain the queue
            self._fail_pending(self.failure or "the engine loop is not running")
        return future

    def post(self, event: Any) -> None:
        """Queue an event (no answer); safe from any thread, the engine thread included."""
        self._queue.put((event, None))

    def wake(self) -> None:
        """Run an iteration now (an idle loop otherwise waits up to ``IDLE_WAKE_S``)."""
        self._queue.put((None, None))

    def health(self) -> LoopHealth:
        """The loop's real state, read without waiting for the loop."""
        since = 0.0 if self._idle else time.monotonic() - self._progress
        has_work = self.snapshot.has_work if self.snapshot is not None else False
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
        loop serves: a dead loop would never run it, a stalled one not for a long time."""
        health = self.health()
        if not health.serving:
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, health.reason)

    # -- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        try:
            while not self._stop.is_set():
                self._drain(wait=not busy)
                if self._stop.is_set():
                    break
                self._progress = time.monotonic()
                busy = self._iterate()
        except BaseException as exc:
            logger.exception("engine loop crashed")
            self.failure = f"the engine loop failed: {type(exc).__name__}: {exc}"
            self.alive = False
            if self.on_crash is not None:
                self.failure = self.on_crash(exc) or self.failure
            self._fail_pending(self.failure)
        finally:
            self.alive = False

    def _drain(self, wait: bool) -> None:
        """Run every queued command and event; with ``wait``, block for the first."""
        items = []
        try:
            if wait:
                self._idle = True
                items.append(self._queue.get(timeout=IDLE_WAKE_S))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        finally:
            self._progress, self._idle = time.monotonic(), False
        answers = [(future, *self._handle(item)) for item, future in items if item is not None]
        if answers:
            self._publish()
        for future, result, error in answers:
            if future is None or not future.set_running_or_notify_cancel():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _handle(self, item: Any) -> tuple[Any, BaseException | None]:
        handler = self._handlers.get(type(item))
        if handler is None:
            return None, TypeError(f"no handler for {type(item).__name__}")
        try:
            return handler(item), None
        except WorkerError as exc:
            return None, exc
        except ValueError as exc:
            return None, WorkerError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # one command's bug fails that command only
            logger.exception("handling %s failed", type(item).__name__)
            why = f"internal error ({type(exc).__name__})"
            return None, WorkerError(grpc.StatusCode.INTERNAL, why)

    def _iterate(self) -> bool:
        """Housekeeping and one step; returns whether the engine had work."""
        self._role.housekeeping(time.monotonic())
        busy = self.engine.has_unfinished_requests()
        if busy:
            self._role.on_outputs(self.engine.step())
            self.num_steps += 1
        else:
            self.engine.heartbeat()  # a parallel replica's followers time out without steps
        self._publish()
        return busy

    def _publish(self) -> None:
        self.block_events.put(*self.engine.kv.pool.drain_events())
        self.snapshot = take_snapshot(self.engine, self._role.load(), self._moe)

    def _fail_pending(self, why: str) -> None:
        error = WorkerError(grpc.StatusCode.UNAVAILABLE, why)
        while True:
            try:
                _, future = self._queue.get_nowait()
            except queue.Empty:
                return
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)
