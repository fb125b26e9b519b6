"""``RedisClusterState``: the router side of the cluster state shared in Redis (keys:
router/state/keys.py; workers write themselves there, router/state/publisher.py).

    workers()      the registry: records + load + in-flight + alive (two round trips);
                   the router refreshes it in the background (router/workers.py discover)
    view(hashes)   one routing decision: load, in-flight, alive and this prompt's prefix
                   scores on every decode worker known from the last refresh, in ONE
                   pipelined round trip
    reserve        a Lua compare-and-increment of the chosen worker's in-flight count: two
                   routers that both saw it at the same load cannot both take it; the loser
                   routes again on fresh state

Every method does blocking I/O: the router calls them off its event loop.

Credentials: the password and TLS files of ``RedisOptions`` (router/state/redis_conn.py);
``url`` is the redacted form, the only one this class shows. A ``workers`` / ``load`` entry
this version cannot read (anyone with Redis access can write one) is skipped and logged
once (router/state/records.py), never raised into a request.

Redis unreachable: every call falls back to ``local`` (a ``MemoryClusterState`` mirror of
the last known state plus this instance's own writes), Redis is retried every ``retry_s``,
and on return the workers registered through this instance are registered again (a
restarted Redis is empty); workers' publishers also re-register and republish their
whole prefix set. For ``heartbeat_ttl_s`` after Redis returns, workers known before the
outage and not yet re-registered stay candidates (from the mirror), so a restarted,
empty Redis never leaves a router without workers.
"""

from __future__ import annotations

import time
from dataclasses import replace

import redis

from engine.config import RedisOptions, StateConfig
from router.state import registration as reg
from router.state.base import ClusterView, Role, WorkerLoad, WorkerRecord
from router.state.keys import Keys
from router.state.memory import MemoryClusterState
from router.state.records import RecordReader
from router.state.redis_link import RedisDown, RedisLink

__all__ = ["RedisClusterState", "RedisDown"]


class RedisClusterState:
    """See the module docstring."""

    blocking = True

    def __init__(
        self,
        url: str,
        *,
        options: RedisOptions | None = None,
        prefix: str = StateConfig.prefix,
        heartbeat_ttl_s: float = StateConfig.heartbeat_ttl_s,
        retry_s: float = 1.0,
    ) -> None:
        self.link = RedisLink(url, options, retry_s, on_back=self._on_back)
        self.url, self.r, self.keys = self.link.url, self.link.r, Keys(prefix)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._reader = RecordReader()
        self.local = MemoryClusterState()
        self._grace_until = 0.0
        self._own: set[str] = set()
        """Workers registered through this instance (re-registered after a Redis restart)."""

    @classmethod
    def from_config(cls, config: StateConfig, retry_s: float = 1.0) -> RedisClusterState:
        if not config.redis_url:
            raise ValueError("a Redis cluster state needs a redis_url (--redis-url)")
        return cls(
            config.redis_url,
            options=config.redis,
            prefix=config.prefix,
            heartbeat_ttl_s=config.heartbeat_ttl_s,
            retry_s=retry_s,
        )

    @property
    def connected(self) -> bool:
        return self.link.connected

    def health(self) -> dict:
        return {"backend": "redis", "url": self.url, "connected": self.connected}

    def _on_back(self) -> None:
        """Register this instance's workers again (a restarted Redis has lost everything)."""
        self._grace_until = time.monotonic() + self.heartbeat_ttl_s
        for w in self.local.workers(healthy_only=False):
            if w.worker_id in self._own:
                try:
                    reg.register(self.link, self.keys, w, self.heartbeat_ttl_s)
                except (redis.RedisError, ValueError):
                    return

    # -- registry -----------------------------------------------------------------------------

    def register(self, worker: WorkerRecord) -> None:
        """Add or replace a worker; ``ValueError`` if its layout differs from the cluster's."""
        try:
            self.link.call(lambda: reg.register(self.link, self.keys, worker, self.heartbeat_ttl_s))
        except RedisDown:
            pass
        self._own.add(worker.worker_id)
        self.local.register(worker)

    def refusals(self) -> dict[str, str]:
        """Workers refused at registration (layout mismatch): worker id -> reason."""
        try:
            return self.link.call(lambda: self.r.hgetall(self.keys.refused))
        except RedisDown:
            return {}

    def deregister(self, worker_id: str, epoch: int | None = None) -> None:
        """Remove the worker (only incarnation ``epoch`` when given: a newer one stays)."""
        self.local.deregister(worker_id)
        self._own.discard(worker_id)
        self.link.attempt(lambda: reg.deregister(self.link, self.keys, worker_id, epoch))

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        self.local.heartbeat(worker_id, load)
        w = self.local.get(worker_id)
        if w is not None:
            ttl = self.heartbeat_ttl_s
            self.link.attempt(lambda: reg.beat(self.link, self.keys, worker_id, w.epoch, load, ttl))

    def mark_unhealthy(self, worker_id: str, epoch: int | None = None) -> None:
        self.local.mark_unhealthy(worker_id, epoch)
        key = self.keys.alive(worker_id)
        if epoch is None:
            self.link.attempt(lambda: self.r.delete(key))
        else:  # only that incarnation's alive key (Lua: compare and delete)
            self.link.attempt(lambda: self.link.script["DROP_ALIVE"](keys=[key], args=[epoch]))

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        try:
            records = self.link.call(self._read_workers)
        except RedisDown:
            return self.local.workers(role, healthy_only)
        if time.monotonic() < self._grace_until:  # a restarted Redis, workers re-registering
            seen = {w.worker_id for w in records}
            records += [w for w in self.local.workers() if w.worker_id not in seen]
        return [
            w
            for w in records
            if (role is None or w.role == role) and (w.healthy or not healthy_only)
        ]

    def _read_workers(self) -> list[WorkerRecord]:
        k = self.keys
        raw = self.r.hgetall(k.workers)
        ids = sorted(raw)
        pipe = self.r.pipeline()
        pipe.hgetall(k.load)
        pipe.hgetall(k.inflight)
        pipe.mget([k.alive(i) for i in ids] or [k.alive("")])
        loads, inflight, alive = pipe.execute()
        records = []
        for i, worker_id in enumerate(ids):
            record = self._reader.record(worker_id, raw[worker_id], loads.get(worker_id), inflight.get(worker_id), alive[i])  # fmt: skip
            if record is None:  # malformed (logged once): skipped, never a failed request
                continue
            records.append(record)
            self._mirror(record)
        if time.monotonic() >= self._grace_until:  # deregistered: not a last-known candidate
            for w in self.local.workers(healthy_only=False):
                if w.worker_id not in raw and w.worker_id not in self._own:
                    self.local.deregister(w.worker_id)
        return records

    def _mirror(self, record: WorkerRecord) -> None:
        """Keep ``local`` current so that an outage serves on the last known state."""
        mine = self.local.get(record.worker_id)
        if mine is None or mine.epoch != record.epoch:
            self.local.register(record)
        else:
            self.local.register(replace(record, last_heartbeat=mine.last_heartbeat))

    def get(self, worker_id: str) -> WorkerRecord | None:
        return next((w for w in self.workers(healthy_only=False) if w.worker_id == worker_id), None)

    # -- one routing decision -----------------------------------------------------------------

    def view(self, block_hashes: list[int]) -> ClusterView:
        """Load, in-flight, health and prefix scores of the workers known from the last
        registry refresh, in one pipelined round trip (see the module docstring)."""
        known = self.local.workers(healthy_only=False)
        if not known:  # nothing refreshed yet: read the registry itself
            self.workers(healthy_only=False)
            known = self.local.workers(healthy_only=False)
        try:
            fresh = self.link.call(lambda: self._read_view(known, block_hashes))
        except RedisDown:
            return self.local.view(block_hashes)
        records, prefix = fresh
        if time.monotonic() < self._grace_until:  # known before the outage: still candidates
            records = [w if w.healthy else self.local.get(w.worker_id) or w for w in records]
        return ClusterView(tuple(records), tuple(block_hashes), prefix)

    def _read_view(self, known: list[WorkerRecord], hashes: list[int]):
        k, decodes = self.keys, [w for w in known if w.role == "decode"]
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(k.load)
        pipe.hgetall(k.inflight)
        pipe.mget([k.alive(w.worker_id) for w in known])
        for w in decodes if hashes else []:
            pipe.zmscore(k.prefix_index(w.worker_id, w.epoch), [str(h) for h in hashes])
        loads, inflight, alive, *scores = pipe.execute()
        records = []
        for w, beat in zip(known, alive, strict=True):
            fresh = replace(
                w,
                load=self._reader.load(w.worker_id, loads.get(w.worker_id)),
                inflight=int(inflight.get(w.worker_id) or 0),
                healthy=beat is not None and beat.isdigit() and int(beat) == w.epoch,
            )
            records.append(fresh)
        prefix = {w.worker_id: _leading(s) for w, s in zip(decodes, scores, strict=False)}
        return records, prefix

    # -- load and reservations ----------------------------------------------------------------

    def add_inflight(self, worker_id: str, delta: int) -> None:
        self.local.add_inflight(worker_id, delta)
        add = self.link.script["ADD_INFLIGHT"]
        self.link.attempt(lambda: add(keys=[self.keys.inflight], args=[worker_id, delta]))

    def reserve(self, worker_id: str, seen_inflight: int) -> bool:
        """Take one in-flight slot on the worker if its count is still ``seen_inflight``."""
        keys, args = [self.keys.inflight, self.keys.workers], [worker_id, seen_inflight]
        try:
            ok = bool(self.link.call(lambda: self.link.script["RESERVE"](keys=keys, args=args)))
        except RedisDown:
            return self.local.reserve(worker_id, seen_inflight)
        if ok:
            self.local.add_inflight(worker_id, 1)
        return ok

    # -- prefix index -------------------------------------------------------------------------

    def record_prefix(self, worker_id: str, block_hashes: list[int]) -> None:
        self.local.record_prefix(worker_id, block_hashes)
        w = self.local.get(worker_id) or self.get(worker_id)
        if w is None or not block_hashes:
            return
        keys = [self.keys.prefix_index(worker_id, w.epoch), self.keys.seq]
        args = [w.num_blocks, *map(str, block_hashes)]
        self.link.attempt(lambda: self.link.script["RECORD_PREFIX"](keys=keys, args=args))

    def apply_block_events(self, worker_id: str, stored: list[int], evicted: list[int]) -> None:
        self.local.apply_block_events(worker_id, stored, evicted)
        w = self.local.get(worker_id) or self.get(worker_id)
        if w is not None and (stored or evicted):
            self.link.attempt(lambda: reg.block_events(self.link, self.keys, w, stored, evicted))

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        if not block_hashes:
            return 0
        w = self.local.get(worker_id) or self.get(worker_id)
        if w is None:
            return 0
        key = self.keys.prefix_index(worker_id, w.epoch)
        try:
            scores = self.link.call(lambda: self.r.zmscore(key, [str(h) for h in block_hashes]))
        except RedisDown:
            return self.local.match_prefix(worker_id, block_hashes)
        return _leading(scores)


def _leading(scores) -> int:
    """How many leading entries of a ZMSCORE reply are present."""
    n = 0
    for s in scores or ():
        if s is None:
            break
        n += 1
    return n
