"""``RedisClusterState``: the ``ClusterState`` protocol shared by routers and workers in Redis.

Keys (``<p>`` = the key prefix, default ``pdserve``); W = written by the worker's publisher
(router/state/publisher.py), R = by routers::

    <p>:layout               W  KV layout JSON of the cluster (the first registration wins)
    <p>:workers              W  hash  worker_id -> record JSON (address, role, ep_size, epoch..)
    <p>:epochs               W  hash  worker_id -> epoch of the registered incarnation
    <p>:alive:<id>           W  epoch, with a TTL renewed by each heartbeat; gone = unhealthy
    <p>:load                 W  hash  worker_id -> WorkerLoad JSON (queued prefill tokens,
                                running/waiting requests, free KV blocks, queue depths)
    <p>:prefix:<id>:<epoch>  W  zset  block hash -> recency, from the engine's block-stored /
                             R  block-evicted events (routers add what they route there);
                                trimmed to the worker's block count
    <p>:seq                  WR recency counter for the prefix zsets
    <p>:refused              W  hash  worker_id -> why its registration was refused
    <p>:inflight             R  hash  worker_id -> requests routed and not finished (all routers)

Registration is one Lua script (``redis_scripts.REGISTER``): the layout check and the
record are written atomically, so a worker of another KV layout is refused with nothing
written (its reason lands in ``<p>:refused``). A worker whose heartbeat lapses leaves the
candidate set. A new epoch drops the old incarnation's prefix index and in-flight count.
``reserve`` is a Lua compare-and-increment: two routers that both saw a worker at the
same load cannot both take it in the same instant; the loser routes again on fresh state.

Credentials: the password and TLS files of ``RedisOptions`` (router/state/redis_conn.py); ``url``
is the redacted form, the only one this class shows. A ``workers`` / ``load`` entry this
version cannot read (anyone with Redis access can write one) is skipped and logged once
(router/state/records.py), never raised into a request.

Redis unreachable: every call falls back to ``local`` (a ``MemoryClusterState`` mirror of
the last known state plus this instance's own writes), Redis is retried every ``retry_s``,
and on return the workers registered through this instance are registered again (a
restarted Redis is empty); workers' publishers also re-register and republish their
whole prefix set. For ``heartbeat_ttl_s`` after Redis returns, workers known before the
outage and not yet re-registered stay candidates (from the mirror), so a restarted,
empty Redis never leaves a router without workers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace

import redis

from engine.config import RedisOptions, StateConfig
from engine.kv_cache.layout import KVLayoutSpec
from router.state import scripts as lua
from router.state.base import MemoryClusterState, Role, WorkerLoad, WorkerRecord
from router.state.records import RecordReader, record_fields
from router.state.redis_conn import connect, redact_url

logger = logging.getLogger(__name__)


class RedisDown(RuntimeError):
    pass


class RedisClusterState:
    """See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        options: RedisOptions | None = None,
        prefix: str = StateConfig.prefix,
        heartbeat_ttl_s: float = StateConfig.heartbeat_ttl_s,
        retry_s: float = 1.0,
    ) -> None:
        self.url = redact_url(url)
        """For display (logs, ``/health``): the password, if the URL has one, is ``***``."""
        self.prefix = prefix
        self.heartbeat_ttl_s, self.retry_s = heartbeat_ttl_s, retry_s
        self.r = connect(
            url, options, decode_responses=True, socket_connect_timeout=0.25, socket_timeout=0.5
        )
        self._reader = RecordReader()
        self.local = MemoryClusterState()
        self.connected = True
        self.errors = 0
        self._retry_at = 0.0
        self._grace_until = 0.0
        self._own: set[str] = set()
        """Workers registered through this instance (re-registered after a Redis restart)."""
        self._add_inflight = self.r.register_script(lua.ADD_INFLIGHT)
        self._reserve = self.r.register_script(lua.RESERVE)
        self._record_prefix = self.r.register_script(lua.RECORD_PREFIX)
        self._drop_alive = self.r.register_script(lua.DROP_ALIVE)
        self._block_events = self.r.register_script(lua.BLOCK_EVENTS)
        self._register = self.r.register_script(lua.REGISTER)
        self._deregister = self.r.register_script(lua.DEREGISTER)

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

    # -- connection ---------------------------------------------------------------------------

    def _k(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    def _call(self, fn):
        """Run ``fn()`` against Redis; raise ``RedisDown`` (and remember it) when unreachable."""
        if not self.connected and time.monotonic() < self._retry_at:
            raise RedisDown(self.url)
        try:
            if not self.connected:
                self.r.ping()
                self.connected = True
                logger.info("redis %s is back: resyncing", self.url)
                self._grace_until = time.monotonic() + self.heartbeat_ttl_s
                self._resync()
            result = fn()
        except redis.RedisError as exc:
            self.errors += 1
            if self.connected:
                logger.warning("redis %s unreachable (%r): serving on the last known state", self.url, exc)  # fmt: skip
            self.connected = False
            self._retry_at = time.monotonic() + self.retry_s
            raise RedisDown(self.url) from exc
        return result

    def _resync(self) -> None:
        """Register this instance's workers again (a restarted Redis has lost everything)."""
        for w in self.local.workers(healthy_only=False):
            if w.worker_id not in self._own:
                continue
            try:
                self._register_now(w)
            except (redis.RedisError, ValueError):
                return

    def health(self) -> dict:
        return {"backend": "redis", "url": self.url, "connected": self.connected}

    # -- registry -----------------------------------------------------------------------------

    def register(self, worker: WorkerRecord) -> None:
        """Add or replace a worker; ``ValueError`` if its layout differs from the cluster's."""
        try:
            self.register_worker(worker)
        except RedisDown:
            self._own.add(worker.worker_id)
            self.local.register(worker)

    def register_worker(self, worker: WorkerRecord) -> None:
        """Like ``register`` but raises ``RedisDown``: a worker registering itself."""
        self._call(lambda: self._register_now(worker))
        self._own.add(worker.worker_id)
        self.local.register(worker)

    def _register_now(self, w: WorkerRecord) -> None:
        keys = [self._k(k) for k in ("layout", "workers", "epochs")]
        keys += [self._k("alive", w.worker_id), self._k("inflight"), self._k("load"), self._k("refused")]  # fmt: skip
        args = [w.layout.to_json(), w.worker_id, json.dumps(record_fields(w)), w.epoch]
        args += [int(self.heartbeat_ttl_s * 1000), self._k("prefix", w.worker_id, ""), json.dumps(asdict(w.load))]  # fmt: skip
        cluster = self._register(keys=keys, args=args)
        if cluster is None:
            return
        try:
            KVLayoutSpec.from_json(cluster).check_compatible(w.layout, ours="cluster", theirs=w.worker_id)  # fmt: skip
            why = f"KV layout of {w.worker_id} differs from the cluster's: {w.layout} vs {cluster}"  # fmt: skip
        except ValueError as exc:
            why = str(exc)
        self.r.hset(self._k("refused"), w.worker_id, why)
        raise ValueError(why)

    def refusals(self) -> dict[str, str]:
        """Workers refused at registration (layout mismatch): worker id -> reason."""
        try:
            return self._call(lambda: self.r.hgetall(self._k("refused")))
        except RedisDown:
            return {}

    def _beat(self, worker_id: str, epoch: int, load: WorkerLoad) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._k("alive", worker_id), epoch, px=int(self.heartbeat_ttl_s * 1000))
        pipe.hset(self._k("load"), worker_id, json.dumps(asdict(load)))
        pipe.execute()

    def deregister(self, worker_id: str, epoch: int | None = None) -> None:
        """Remove the worker (only incarnation ``epoch`` when given: a newer one stays)."""
        self.local.deregister(worker_id)
        self._own.discard(worker_id)

        def drop():
            e = epoch if epoch is not None else self.r.hget(self._k("epochs"), worker_id)
            if e is None:
                return
            keys = [self._k(k) for k in ("workers", "load", "epochs", "inflight", "refused")]
            keys += [self._k("alive", worker_id), self._k("prefix", worker_id, e)]
            self._deregister(keys=keys, args=[worker_id, e])

        self._try(drop)

    def publish_load(self, worker_id: str, epoch: int, load: WorkerLoad) -> None:
        """Worker side: renew the heartbeat TTL and publish the load; raises ``RedisDown``."""
        self._call(lambda: self._beat(worker_id, epoch, load))

    def publish_blocks(
        self, w: WorkerRecord, stored: list[int], evicted: list[int], reset: bool = False
    ) -> None:
        """Worker side: its prefix-cache events (``reset``: ``stored`` is the whole cache)."""
        keys = [self._k("prefix", w.worker_id, w.epoch), self._k("seq")]
        args = [w.num_blocks, len(stored), "1" if reset else "0", *map(str, stored), *map(str, evicted)]  # fmt: skip
        self._call(lambda: self._block_events(keys=keys, args=args))

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        self.local.heartbeat(worker_id, load)
        w = self.local.get(worker_id)
        if w is not None:
            self._try(lambda: self._beat(worker_id, w.epoch, load))

    def mark_unhealthy(self, worker_id: str, epoch: int | None = None) -> None:
        self.local.mark_unhealthy(worker_id, epoch)
        key = self._k("alive", worker_id)
        if epoch is None:
            self._try(lambda: self.r.delete(key))
        else:  # only that incarnation's alive key (Lua: compare and delete)
            self._try(lambda: self._drop_alive(keys=[key], args=[epoch]))

    def _try(self, fn) -> None:
        try:
            self._call(fn)
        except RedisDown:
            pass

    def workers(self, role: Role | None = None, healthy_only: bool = True) -> list[WorkerRecord]:
        try:
            records = self._call(self._read_workers)
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
        raw = self.r.hgetall(self._k("workers"))
        ids = sorted(raw)
        pipe = self.r.pipeline()
        pipe.hgetall(self._k("load"))
        pipe.hgetall(self._k("inflight"))
        pipe.mget([self._k("alive", i) for i in ids] or [self._k("alive", "")])
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

    # -- load and reservations ----------------------------------------------------------------

    def add_inflight(self, worker_id: str, delta: int) -> None:
        self.local.add_inflight(worker_id, delta)
        self._try(lambda: self._add_inflight(keys=[self._k("inflight")], args=[worker_id, delta]))

    def reserve(self, worker_id: str, seen_inflight: int) -> bool:
        """Take one in-flight slot on the worker if its count is still ``seen_inflight``."""
        try:
            keys, args = [self._k("inflight"), self._k("workers")], [worker_id, seen_inflight]
            ok = bool(self._call(lambda: self._reserve(keys=keys, args=args)))
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
        keys = [self._k("prefix", worker_id, w.epoch), self._k("seq")]
        args = [w.num_blocks, *map(str, block_hashes)]
        self._try(lambda: self._record_prefix(keys=keys, args=args))

    def apply_block_events(self, worker_id: str, stored: list[int], evicted: list[int]) -> None:
        self.local.apply_block_events(worker_id, stored, evicted)
        w = self.local.get(worker_id) or self.get(worker_id)
        if w is None or not (stored or evicted):
            return
        keys = [self._k("prefix", worker_id, w.epoch), self._k("seq")]
        args = [w.num_blocks, len(stored), "0", *map(str, stored), *map(str, evicted)]
        self._try(lambda: self._block_events(keys=keys, args=args))

    def match_prefix(self, worker_id: str, block_hashes: list[int]) -> int:
        if not block_hashes:
            return 0
        w = self.local.get(worker_id) or self.get(worker_id)
        if w is None:
            return 0
        key = self._k("prefix", worker_id, w.epoch)
        try:
            scores = self._call(lambda: self.r.zmscore(key, [str(h) for h in block_hashes]))
        except RedisDown:
            return self.local.match_prefix(worker_id, block_hashes)
        n = 0
        for s in scores:
            if s is None:
                break
            n += 1
        return n
