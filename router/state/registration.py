"""Writing a worker into the Redis cluster state: registration (with the layout check),
heartbeats with load, prefix-cache events, and deregistration of one incarnation.

``WorkerRedis`` is the worker side's whole view of Redis (router/state/publisher.py); the
router side (router/state/redis.py) uses the same writes for workers it registers itself.

Registration is one Lua script (``scripts.REGISTER``): the layout check and the record are
written atomically, so a worker of another KV layout is refused with nothing written (its
reason lands in ``<p>:refused``). A new epoch drops the old incarnation's prefix index and
in-flight count.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from engine.config import StateConfig
from engine.kv_cache.spec import KVLayoutSpec
from router.state.base import WorkerLoad, WorkerRecord
from router.state.keys import Keys
from router.state.records import record_fields
from router.state.redis_link import RedisLink


def register(link: RedisLink, k: Keys, w: WorkerRecord, ttl_s: float) -> None:
    """Register ``w``; ``ValueError`` naming both layouts if the cluster's differs."""
    keys = [k.layout, k.workers, k.epochs, k.alive(w.worker_id), k.inflight, k.load, k.refused]
    args = [w.layout.to_json(), w.worker_id, json.dumps(record_fields(w)), w.epoch]
    args += [int(ttl_s * 1000), k.prefix_index(w.worker_id, ""), json.dumps(asdict(w.load))]
    cluster = link.script["REGISTER"](keys=keys, args=args)
    if cluster is None:
        return
    try:
        KVLayoutSpec.from_json(cluster).check_compatible(w.layout, ours="cluster", theirs=w.worker_id)  # fmt: skip
        why = f"KV layout of {w.worker_id} differs from the cluster's: {w.layout} vs {cluster}"
    except ValueError as exc:
        why = str(exc)
    link.r.hset(k.refused, w.worker_id, why)
    raise ValueError(why)


def beat(
    link: RedisLink, k: Keys, worker_id: str, epoch: int, load: WorkerLoad, ttl_s: float
) -> bool:
    """Renew the worker's alive TTL and publish its load (one round trip); ``False`` when
    the worker is not registered there (a Redis restarted empty between two beats, too
    quickly for any call to fail): the caller registers again."""
    pipe = link.r.pipeline()
    pipe.set(k.alive(worker_id), epoch, px=int(ttl_s * 1000))
    pipe.hset(k.load, worker_id, json.dumps(asdict(load)))
    pipe.hget(k.epochs, worker_id)
    return pipe.execute()[2] is not None


def deregister(link: RedisLink, k: Keys, worker_id: str, epoch: int | None) -> None:
    """Remove incarnation ``epoch`` (``None``: whichever is registered)."""
    e = epoch if epoch is not None else link.r.hget(k.epochs, worker_id)
    if e is None:
        return
    keys = [k.workers, k.load, k.epochs, k.inflight, k.refused]
    keys += [k.alive(worker_id), k.prefix_index(worker_id, e)]
    link.script["DEREGISTER"](keys=keys, args=[worker_id, e])


def block_events(
    link: RedisLink, k: Keys, w: WorkerRecord, stored: list[int], evicted: list[int], reset=False
) -> None:
    """Prefix-cache events of ``w`` (``reset``: ``stored`` is its whole cache)."""
    keys = [k.prefix_index(w.worker_id, w.epoch), k.seq]
    args = [w.num_blocks, len(stored), "1" if reset else "0", *map(str, stored), *map(str, evicted)]  # fmt: skip
    link.script["BLOCK_EVENTS"](keys=keys, args=args)


class WorkerRedis:
    """The worker side's writes; every call raises ``RedisDown`` while Redis is away."""

    def __init__(self, config: StateConfig, retry_s: float = 0.5) -> None:
        if not config.redis_url:
            raise ValueError("a worker publishes to Redis only with a redis_url (--redis-url)")
        self.config, self.keys = config, Keys(config.prefix)
        self.link = RedisLink(config.redis_url, config.redis, retry_s)
        self.url = self.link.url

    def register(self, w: WorkerRecord) -> None:
        self.link.call(lambda: register(self.link, self.keys, w, self.config.heartbeat_ttl_s))

    def publish_load(self, worker_id: str, epoch: int, load: WorkerLoad) -> bool:
        """``False``: Redis does not know the worker (register again)."""
        ttl = self.config.heartbeat_ttl_s
        return self.link.call(lambda: beat(self.link, self.keys, worker_id, epoch, load, ttl))

    def publish_blocks(self, w: WorkerRecord, stored, evicted, reset: bool = False) -> None:
        self.link.call(lambda: block_events(self.link, self.keys, w, stored, evicted, reset))

    def deregister(self, worker_id: str, epoch: int) -> None:
        self.link.attempt(lambda: deregister(self.link, self.keys, worker_id, epoch))
