"""ClusterState behaviour, the same for MemoryClusterState and RedisClusterState (a real
redis-server on a loopback port), plus what only the shared Redis state does."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import pytest

from engine.kv_cache.spec import KVLayoutSpec
from router.state.base import WorkerLoad, WorkerRecord
from router.state.memory import MemoryClusterState
from router.state.redis import RedisClusterState
from tests.redis_server import RedisServer
from tests.waiting import Threads, wait_until

SPEC = KVLayoutSpec("fp", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)


def rec(worker_id: str, role="decode", epoch=1, num_blocks=8, layout=SPEC) -> WorkerRecord:
    return WorkerRecord(worker_id, role, f"127.0.0.1:{abs(hash(worker_id)) % 50000 + 1000}",
                        layout, num_blocks, 128, epoch)  # fmt: skip


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.close()


def redis_state(server, prefix: str, **kw) -> RedisClusterState:
    return RedisClusterState(server.url, prefix=prefix, **kw)


@pytest.fixture(params=["memory", "redis"])
def state(request, server):
    if request.param == "memory":
        return MemoryClusterState()
    return redis_state(server, f"t{uuid.uuid4().hex[:8]}")


def test_registry_roles_health(state):
    state.register(rec("d0"))
    state.register(rec("p0", "prefill"))
    assert {w.worker_id for w in state.workers()} == {"d0", "p0"}
    assert [w.worker_id for w in state.workers("prefill")] == ["p0"]
    state.heartbeat("d0", WorkerLoad(num_free_blocks=5, queued_prefill_tokens=7))
    assert state.get("d0").load.queued_prefill_tokens == 7
    assert state.get("d0").load.num_free_blocks == 5
    state.mark_unhealthy("d0")
    assert state.workers("decode") == []
    assert [w.healthy for w in state.workers("decode", healthy_only=False)] == [False]
    state.heartbeat("d0", WorkerLoad())
    assert [w.worker_id for w in state.workers("decode")] == ["d0"]
    state.register(rec("d0", epoch=2))  # restarted
    state.heartbeat("d0", WorkerLoad())
    state.mark_unhealthy("d0", epoch=1)  # a failure seen on the old incarnation
    assert [(w.worker_id, w.epoch) for w in state.workers("decode")] == [("d0", 2)]
    state.mark_unhealthy("d0", epoch=2)
    assert state.workers("decode") == []
    state.heartbeat("d0", WorkerLoad())
    state.deregister("d0")
    assert state.get("d0") is None and len(state.workers(healthy_only=False)) == 1
    assert state.health()["connected"] is True


def test_prefix_index_lru_and_epochs(state):
    state.register(rec("d0", num_blocks=4))
    state.record_prefix("d0", [1, 2, 3])
    assert state.match_prefix("d0", [1, 2, 3, 9]) == 3
    assert state.match_prefix("d0", [2, 3]) == 2
    assert state.match_prefix("d0", [9, 1]) == 0
    state.record_prefix("d0", [4, 5])  # over 4 blocks: the oldest (1) goes
    assert state.match_prefix("d0", [1, 2]) == 0
    assert state.match_prefix("d0", [2, 3, 4, 5]) == 4
    state.register(rec("d0", num_blocks=4))  # same incarnation re-registered: kept
    assert state.match_prefix("d0", [2]) == 1
    state.add_inflight("d0", 2)
    state.register(rec("d0", epoch=2, num_blocks=4))  # restarted: its cache is empty
    assert state.match_prefix("d0", [2]) == 0
    assert state.get("d0").epoch == 2 and state.get("d0").inflight == 0


def test_inflight_and_reservation(state):
    state.register(rec("d0"))
    state.add_inflight("d0", 2)
    state.add_inflight("d0", -5)
    assert state.get("d0").inflight == 0
    assert state.reserve("d0", 0) is True
    assert state.reserve("d0", 0) is False  # someone else took it since we looked
    assert state.get("d0").inflight == 1
    assert state.reserve("nope", 0) is False  # an unregistered worker has no slot to take
    assert state.get("nope") is None


def test_routers_share_state(server):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b = redis_state(server, prefix), redis_state(server, prefix)
    a.register(replace(rec("d0"), ep_size=2))
    a.heartbeat("d0", WorkerLoad(num_running=3))
    a.record_prefix("d0", [11, 12])
    a.add_inflight("d0", 1)
    [w] = b.workers("decode")
    assert (w.worker_id, w.load.num_running, w.inflight, w.ep_size) == ("d0", 3, 1, 2)
    assert b.match_prefix("d0", [11, 12, 13]) == 2
    # a new router (or a restarted one) loses nothing
    assert redis_state(server, prefix).match_prefix("d0", [11, 12]) == 2


def test_reservation_is_atomic_across_routers(server):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    routers = [redis_state(server, prefix) for _ in range(8)]
    routers[0].register(rec("d0"))
    for r in routers:
        r.workers()
    won, go = [], threading.Barrier(len(routers))

    def take(r):
        go.wait()
        won.append(r.reserve("d0", 0))

    threads = Threads()
    for r in routers:
        threads.start(take, r)
    threads.join(30)
    assert sorted(won) == [False] * 7 + [True]
    assert routers[3].get("d0").inflight == 1


def test_heartbeat_ttl_lapses(server):
    """Each heartbeat renews the worker's TTL; without heartbeats it lapses, no sooner than
    one TTL after the last one. Time is read from Redis (the key's PTTL), never slept."""
    prefix, ttl_ms = f"t{uuid.uuid4().hex[:8]}", 2000
    s = redis_state(server, prefix, heartbeat_ttl_s=ttl_ms / 1000)
    alive = server.client()
    key = f"{prefix}:alive:d0"
    s.register(rec("d0"))
    assert 0 < alive.pttl(key) <= ttl_ms and len(s.workers("decode")) == 1
    wait_until(lambda: alive.pttl(key) < ttl_ms / 2, timeout=ttl_ms / 1000 + 5)
    renewed_at = time.monotonic()
    s.heartbeat("d0", WorkerLoad())
    assert alive.pttl(key) > ttl_ms / 2, "the heartbeat did not renew the TTL"
    assert len(s.workers("decode")) == 1
    wait_until(lambda: s.workers("decode") == [], timeout=ttl_ms / 1000 + 10)
    assert time.monotonic() - renewed_at >= ttl_ms / 1000 - 0.05, "lapsed before its TTL"
    assert len(s.workers("decode", healthy_only=False)) == 1


def test_mismatched_layout_refused(server):
    s = redis_state(server, f"t{uuid.uuid4().hex[:8]}")
    s.register(rec("d0"))
    other = KVLayoutSpec("fp", 2, 2, 8, "float32", block_size=8)
    with pytest.raises(ValueError, match="block_size mismatch: cluster=4, d1=8"):
        s.register(rec("d1", layout=other))
    assert [w.worker_id for w in s.workers(healthy_only=False)] == ["d0"]


def test_redis_down_keeps_last_state_and_resyncs():
    server = RedisServer().start()
    try:
        s = RedisClusterState(server.url, prefix="down", retry_s=0.1)
        s.register(rec("d0"))
        s.record_prefix("d0", [1, 2])
        assert len(s.workers("decode")) == 1
        server.stop()
        assert [w.worker_id for w in s.workers("decode")] == ["d0"]  # last known state
        assert s.health()["connected"] is False
        assert s.match_prefix("d0", [1, 2]) == 2
        s.heartbeat("d0", WorkerLoad(num_running=1))
        server.start()  # empty: no persistence
        # Redis is retried every retry_s: some heartbeat after that finds it again.
        wait_until(lambda: (s.heartbeat("d0", WorkerLoad(num_running=2)), s.health()["connected"])[1])  # fmt: skip
        fresh = RedisClusterState(server.url, prefix="down")
        [w] = fresh.workers("decode")
        assert (w.worker_id, w.load.num_running) == ("d0", 2)
    finally:
        server.close()


def test_block_events_correct_the_index(state):
    state.register(rec("d0", num_blocks=4))
    state.record_prefix("d0", [1, 2, 3])
    state.apply_block_events("d0", stored=[7, 8], evicted=[2])
    assert state.match_prefix("d0", [1, 2, 3]) == 1  # 2 left the worker's cache
    assert state.match_prefix("d0", [7, 8]) == 2
    assert state.match_prefix("d0", [3]) == 1
    state.apply_block_events("d0", stored=[9], evicted=[])  # capped at 4 blocks: 1 goes
    assert state.match_prefix("d0", [1]) == 0 and state.match_prefix("d0", [9]) == 1
