"""``RedisClusterState``: the ``ClusterState`` protocol shared by several routers in Redis.

Keys (``<p>`` = the key prefix, default ``pdserve``)::

    <p>:layout                   KV layout JSON of the cluster (first registration wins)
    <p>:workers                  hash  worker_id -> record JSON (address, role, epoch, ...)
    <p>:alive:<id>               epoch, with a TTL: renewed by each heartbeat; gone = unhealthy
    <p>:load                     hash  worker_id -> WorkerLoad JSON (last Stats)
    <p>:inflight                 hash  worker_id -> requests routed and not finished (all routers)
    <p>:prefix:<id>:<epoch>      zset  block hash -> recency; trimmed to the worker's block count
    <p>:seq                      recency counter for the prefix zsets

A worker whose heartbeat lapses (``heartbeat_ttl_s``) leaves the candidate set. A new
epoch drops the old incarnation's prefix index and in-flight count. ``reserve`` is a Lua
compare-and-increment: two routers that both saw a worker at the same load cannot both
take it in the same instant; the loser routes again on fresh state.

Redis unreachable: every call falls back to ``local`` (a ``MemoryClusterState`` mirror of
the last known state plus this router's own writes), Redis is retried every ``retry_s``,
and on return this router's registrations are pushed again (a restarted Redis is empty).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace

import redis

from engine.kv_cache.layout import KVLayoutSpec
from router.cluster import MemoryClusterState, Role, WorkerLoad, WorkerRecord

logger = logging.getLogger(__name__)

_ADD_INFLIGHT = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') + tonumber(ARGV[2])
if v < 0 then v = 0 end
redis.call('HSET', KEYS[1], ARGV[1], v)
return v
"""

_RESERVE = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if v ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], v + 1)
return 1
"""

_RECORD_PREFIX = """
local seq = redis.call('INCRBY', KEYS[2], #ARGV - 1)
local cap = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], seq - #ARGV + i, ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
return 1
"""


_BLOCK_EVENTS = """
local seq = redis.call('INCRBY', KEYS[2], #ARGV)
local cap, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, 2 + n do redis.call('ZADD', KEYS[1], seq - #ARGV + i, ARGV[i]) end
for i = 3 + n, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(cap + 1))
return 1
"""


class RedisDown(RuntimeError):
    pass


class RedisClusterState:
    """See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pdserve",
        heartbeat_ttl_s: float = 3.0,
        retry_s: float = 1.0,
    ) -> None:
        self.url, self.prefix = url, prefix
        self.heartbeat_ttl_s, self.retry_s = heartbeat_ttl_s, retry_s
        self.r = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=0.25, socket_timeout=0.5
        )
        self.local = MemoryClusterState()
        self.connected = True
        self.errors = 0
        self._retry_at = 0.0
        self._add_inflight = self.r.register_script(_ADD_INFLIGHT)
        self._reserve = self.r.register_script(_RESERVE)
        self._record_prefix = self.r.register_script(_RECORD_PREFIX)
        self._block_events = self.r.register_script(_BLOCK_EVENTS)

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
        """Push this router's view again (a restarted Redis has lost everything)."""
        for w in self.local.workers(healthy_only=False):
            try:
                self.r.set(self._k("layout"), w.layout.to_json(), nx=True)
                self._put(w)
                if w.healthy:
                    self._beat(w.worker_id, w.epoch, w.load)
            except redis.RedisError:
                return

    def health(self) -> dict:
        return {"backend": "redis", "url": self.url, "connected": self.connected}

    # -- registry -----------------------------------------------------------------------------

    def register(self, worker: WorkerRecord) -> None:
        """Add or replace a worker; ``ValueError`` if its layout differs from the cluster's."""
        try:
            self._call(lambda: self._check_layout(worker))
            old = self._call(lambda: self.r.hget(self._k("workers"), worker.worker_id))
            self._call(lambda: self._put(worker, json.loads(old)["epoch"] if old else None))
            self._call(lambda: self._beat(worker.worker_id, worker.epoch, worker.load))
        except RedisDown:
            pass
        self.local.register(worker)

    def _check_layout(self, worker: WorkerRecord) -> None:
        self.r.set(self._k("layout"), worker.layout.to_json(), nx=True)
        cluster = KVLayoutSpec.from_json(self.r.get(self._k("layout")))
        cluster.check_compatible(worker.layout, ours="cluster", theirs=worker.worker_id)

    def _put(self, w: WorkerRecord, old_epoch: int | None = None) -> None:
        fields = {
            "worker_id": w.worker_id,
            "role": w.role,
            "address": w.address,
            "layout": asdict(w.layout),
            "num_blocks": w.num_blocks,
            "max_model_len": w.max_model_len,
            "epoch": w.epoch,
            "hostname": w.hostname,
            "ep_size": w.ep_size,
            "kv_transports": list(w.kv_transports),
        }
        pipe = self.r.pipeline()
        if old_epoch is not None and old_epoch != w.epoch:
            pipe.delete(self._k("prefix", w.worker_id, old_epoch))
            pipe.hset(self._k("inflight"), w.worker_id, 0)
        pipe.hset(self._k("workers"), w.worker_id, json.dumps(fields))
        pipe.execute()

    def _beat(self, worker_id: str, epoch: int, load: WorkerLoad) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._k("alive", worker_id), epoch, px=int(self.heartbeat_ttl_s * 1000))
        pipe.hset(self._k("load"), worker_id, json.dumps(asdict(load)))
        pipe.execute()

    def deregister(self, worker_id: str) -> None:
        self.local.deregister(worker_id)

        def drop():
            old = self.r.hget(self._k("workers"), worker_id)
            pipe = self.r.pipeline()
            if old:
                pipe.delete(self._k("prefix", worker_id, json.loads(old)["epoch"]))
            for key in ("workers", "load", "inflight"):
                pipe.hdel(self._k(key), worker_id)
            pipe.delete(self._k("alive", worker_id))
            pipe.execute()

        self._try(drop)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        self.local.heartbeat(worker_id, load)
        w = self.local.get(worker_id)
        if w is not None:
            self._try(lambda: self._beat(worker_id, w.epoch, load))

    def mark_unhealthy(self, worker_id: str) -> None:
        self.local.mark_unhealthy(worker_id)
        self._try(lambda: self.r.delete(self._k("alive", worker_id)))

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
            f = json.loads(raw[worker_id])
            record = WorkerRecord(
                worker_id=worker_id,
                role=f["role"],
                address=f["address"],
                layout=KVLayoutSpec(**f["layout"]),
                num_blocks=f["num_blocks"],
                max_model_len=f["max_model_len"],
                epoch=f["epoch"],
                hostname=f["hostname"],
                ep_size=f.get("ep_size", 1),
                kv_transports=tuple(f["kv_transports"]),
                healthy=alive[i] is not None and int(alive[i]) == f["epoch"],
                load=_load(loads.get(worker_id)),
                inflight=int(inflight.get(worker_id, 0)),
            )
            records.append(record)
            self._mirror(record)
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
            keys, args = [self._k("inflight")], [worker_id, seen_inflight]
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
        args = [w.num_blocks, len(stored), *map(str, stored), *map(str, evicted)]
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


def _load(text: str | None) -> WorkerLoad:
    return WorkerLoad(**json.loads(text)) if text else WorkerLoad()
