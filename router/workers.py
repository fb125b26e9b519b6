"""Worker registration (with the layout check), gRPC clients and health/load polling.

Two modes:
- in memory (no ``--redis-url``): the router registers worker addresses (``sync``: gRPC
  ``Info``, layout check) and polls each worker every ``poll_interval_s`` (``poll_once``):
  ``Health`` first, the engine loop's real state (a worker whose loop died or stalled is
  marked down: ``Stats`` alone would still answer), then ``Stats`` for load and block
  events;
- shared state in Redis: workers register and publish themselves (router/state/publisher.py);
  the router only ``discover``s them: a gRPC client per registered incarnation (a new
  epoch closes the old client), refused registrations logged, metrics from the state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from engine.grpc_auth import aio_channel
from engine.kv_cache.spec import KVLayoutSpec
from engine.kv_cache.spec_pb import spec_from_pb
from engine.security import ClusterSecret
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.metrics import Metrics
from router.state.base import ClusterState, WorkerRecord, load_from_stats, record_from_info
from router.state_calls import StateCalls

logger = logging.getLogger(__name__)


class WorkerClient:
    """gRPC stubs for one worker incarnation."""

    def __init__(self, address: str, secret: ClusterSecret | None = None) -> None:
        self.address = address
        self.channel = aio_channel(address, secret)  # every call carries a token with a secret
        self.decode = rpc.DecodeServiceStub(self.channel)
        self.prefill = rpc.PrefillServiceStub(self.channel)

    def stub(self, role: str):
        return self.decode if role == "decode" else self.prefill

    async def close(self) -> None:
        await self.channel.close()


async def fetch_info(client: WorkerClient, timeout: float) -> pb.InfoResponse:
    """Ask a worker of either role who it is."""
    try:
        return await client.decode.Info(pb.InfoRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return await client.prefill.Info(pb.InfoRequest(), timeout=timeout)


@dataclass
class Refusal:
    address: str
    worker_id: str
    reason: str


@dataclass
class Registry:
    """Registers workers into a ``ClusterState`` and keeps their health and load fresh."""

    state: ClusterState
    metrics: Metrics
    poll_interval_s: float = 0.5
    io: StateCalls | None = None
    """Runs the state's calls off the event loop (built from ``state`` when not given)."""
    rpc_timeout_s: float = 2.0
    layout: KVLayoutSpec | None = None
    """The cluster's KV layout: the first registered worker's, every later one must match."""
    secret: ClusterSecret | None = None
    """The cluster secret every worker call proves (engine/grpc_auth.py)."""
    clients: dict[str, WorkerClient] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    """The incarnation each client was opened for."""
    refused: list[Refusal] = field(default_factory=list)
    known: list[WorkerRecord] = field(default_factory=list)
    """Every registered worker as of the last refresh (no I/O to read it)."""
    _failures: dict[str, int] = field(default_factory=dict)
    _logged_refusals: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.io = self.io or StateCalls(self.state)

    def known_workers(self) -> list[WorkerRecord]:
        """The registry without a round trip: an in-memory state's own, else the last
        refresh's (every ``poll_interval_s``)."""
        if not getattr(self.state, "blocking", True):
            return self.state.workers(healthy_only=False)
        return self.known

    async def register(self, address: str) -> WorkerRecord | None:
        """Register the worker at ``address``; ``None`` (and an error log) if refused."""
        client = WorkerClient(address, self.secret)
        try:
            info = await fetch_info(client, self.rpc_timeout_s)
        except grpc.aio.AioRpcError:
            await client.close()
            raise
        spec, record = spec_from_pb(info.layout), record_from_info(info, address)
        try:
            if self.layout is not None:
                self.layout.check_compatible(spec, ours="cluster", theirs=info.worker_id)
            await self.io(self.state.register, record)  # a shared state checks the layout too
        except ValueError as exc:
            logger.error("refusing %s worker %s at %s: %s", info.role, info.worker_id, address, exc)  # fmt: skip
            self.refused.append(Refusal(address, info.worker_id, str(exc)))
            await client.close()
            return None
        self.layout = self.layout or spec
        old = self.clients.pop(info.worker_id, None)
        if old is not None:
            await old.close()
        self.clients[info.worker_id], self.epochs[info.worker_id] = client, info.epoch
        self._failures.pop(info.worker_id, None)
        logger.info(
            "registered %s worker %s at %s (epoch %d, %d KV blocks)",
            record.role, record.worker_id, record.address, record.epoch, record.num_blocks,
        )  # fmt: skip
        return record

    async def sync(self, addresses: list[str]) -> None:
        """Register new addresses; drop workers whose address is gone (restarted elsewhere)."""
        # Known = workers this router holds connections to (a shared state also lists
        # workers other routers registered).
        known = {c.address: worker_id for worker_id, c in self.clients.items()}
        refused = {r.address for r in self.refused}
        for address in addresses:
            if address in known or address in refused:
                continue
            try:
                await self.register(address)
            except grpc.aio.AioRpcError as exc:  # details name the fix of UNAUTHENTICATED
                logger.warning("cannot register worker at %s yet: %s %s", address, exc.code(), exc.details())  # fmt: skip
        for address, worker_id in known.items():
            if address not in addresses:
                current = await self.io(self.state.get, worker_id)
                if current is None or current.address == address:
                    await self.deregister(worker_id)
                elif self.clients.get(worker_id) is not None:  # re-registered elsewhere
                    await self.clients.pop(worker_id).close()

    async def discover(self) -> None:
        """Redis mode: connect to every registered incarnation, drop the vanished ones."""
        self.known = await self.io(self.state.workers, None, False)
        records = {w.worker_id: w for w in self.known}
        for w in records.values():
            self.layout = self.layout or w.layout
            if w.worker_id in self.clients and self.epochs.get(w.worker_id) == w.epoch:
                continue
            old = self.clients.pop(w.worker_id, None)
            if old is not None:
                logger.info("worker %s has a new epoch %d: reconnecting", w.worker_id, w.epoch)
                await old.close()
            self.clients[w.worker_id] = WorkerClient(w.address, self.secret)
            self.epochs[w.worker_id] = w.epoch
            logger.info(
                "discovered %s worker %s at %s (epoch %d, ep_size %d, tp_size %d, %d KV blocks)",
                w.role, w.worker_id, w.address, w.epoch, w.ep_size, w.tp_size, w.num_blocks,
            )  # fmt: skip
        for worker_id in set(self.clients) - set(records):
            logger.info("worker %s left the registry", worker_id)
            self.metrics.forget_worker(worker_id)
            await self.clients.pop(worker_id).close()
        await self._log_refusals()
        self.publish_metrics(list(records.values()))

    async def _log_refusals(self) -> None:
        refusals = await self.io(getattr(self.state, "refusals", dict))
        for worker_id, why in refusals.items():
            if f"{worker_id}:{why}" not in self._logged_refusals:
                self._logged_refusals.add(f"{worker_id}:{why}")
                self.refused.append(Refusal("", worker_id, why))
                logger.error("refused worker %s: %s", worker_id, why)

    def publish_metrics(self, workers: list[WorkerRecord]) -> None:
        """Worker gauges from the state (Redis mode: what the workers published)."""
        self.metrics.state_connected.set(1 if self.state.health()["connected"] else 0)
        for role in ("prefill", "decode"):
            for healthy in (True, False):
                n = sum(1 for w in workers if w.role == role and w.healthy == healthy)
                self.metrics.workers.labels(role=role, healthy=str(healthy).lower()).set(n)
        for w in workers:
            self.metrics.worker_stats(w.worker_id, w.num_blocks, w.load.num_free_blocks, w.load.queues)  # fmt: skip
            self.metrics.kv_pool(w.worker_id, w.num_blocks, w.layout)
            if w.load.expert_tokens:
                self.metrics.expert_stats(w.worker_id, w.load.expert_tokens, w.ep_size)

    async def deregister(self, worker_id: str) -> None:
        await self.io(self.state.deregister, worker_id)
        self.metrics.forget_worker(worker_id)
        client = self.clients.pop(worker_id, None)
        if client is not None:
            await client.close()

    def client(self, worker: WorkerRecord) -> WorkerClient:
        """The connection to ``worker``'s incarnation: a record newer than the open client
        (restarted before ``discover`` ran) gets a fresh one, and the stale one is closed."""
        client = self.clients.get(worker.worker_id)
        if client is not None and self.epochs.get(worker.worker_id) == worker.epoch:
            return client
        fresh = WorkerClient(worker.address, self.secret)
        self.clients[worker.worker_id], self.epochs[worker.worker_id] = fresh, worker.epoch
        if client is not None:
            logger.info(
                "worker %s has a new epoch %d: reconnecting", worker.worker_id, worker.epoch
            )
            asyncio.get_running_loop().create_task(client.close())
        return fresh

    async def poll_once(self) -> None:
        workers = self.known = await self.io(self.state.workers, None, False)
        self.metrics.state_connected.set(1 if self.state.health()["connected"] else 0)
        await asyncio.gather(*(self._poll(w) for w in workers))
        for role in ("prefill", "decode"):
            for healthy in (True, False):
                n = sum(1 for w in workers if w.role == role and w.healthy == healthy)
                self.metrics.workers.labels(role=role, healthy=str(healthy).lower()).set(n)

    async def _poll(self, w: WorkerRecord) -> None:
        client = self.clients.get(w.worker_id)
        if client is None:
            return
        if self.epochs.get(w.worker_id, w.epoch) != w.epoch:
            # Another router registered a new incarnation: drop our connection to the old.
            logger.info("worker %s has a new epoch %d: reconnecting", w.worker_id, w.epoch)
            await self.clients.pop(w.worker_id).close()
            await self.register(w.address)
            return
        stub = client.stub(w.role)
        try:
            health = await stub.Health(pb.HealthRequest(), timeout=self.rpc_timeout_s)
            if not health.serving:
                await self._mark_down(w, health.reason or "its engine loop is not serving")
                return
            stats = await stub.Stats(pb.StatsRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self._mark_down(w, str(exc.code()))
            return
        load = load_from_stats(stats)
        queues = load.queues
        if not w.healthy:
            logger.info("worker %s at %s answers again", w.worker_id, w.address)
            info = await fetch_info(client, self.rpc_timeout_s)
            if info.epoch != w.epoch:  # restarted in place: a new incarnation
                await self.register(w.address)
                return
        await self.io(self.state.heartbeat, w.worker_id, load)
        stored, evicted = list(stats.stored_block_hashes), list(stats.evicted_block_hashes)
        if stored or evicted:
            await self.io(self.state.apply_block_events, w.worker_id, stored, evicted)
        self.metrics.worker_stats(w.worker_id, stats.num_blocks, stats.num_free_blocks, queues)
        self.metrics.kv_pool(w.worker_id, stats.num_blocks, w.layout)
        if stats.expert_tokens:
            self.metrics.expert_stats(w.worker_id, list(stats.expert_tokens), stats.ep_size or 1)

    async def _mark_down(self, w: WorkerRecord, why: str) -> None:
        self._failures[w.worker_id] = self._failures.get(w.worker_id, 0) + 1
        if w.healthy:
            logger.warning("worker %s at %s is unhealthy: %s", w.worker_id, w.address, why)
        await self.io(self.state.mark_unhealthy, w.worker_id, w.epoch)

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                logger.exception("health poll failed")
            await asyncio.sleep(self.poll_interval_s)

    async def close(self) -> None:
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()
