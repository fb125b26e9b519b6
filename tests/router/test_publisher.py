"""The worker-side publisher against a real redis-server: registration, coalesced load
and prefix events, a Redis restart (re-register + whole prefix set), refusal, deregister."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest

from engine.config import StateConfig
from engine.kv_cache.spec import KVLayoutSpec
from router.metrics import Metrics
from router.state.base import WorkerLoad, WorkerRecord
from router.state.publisher import LayoutRefused, WorkerPublisher
from router.state.redis import RedisClusterState
from router.workers import Registry
from tests.redis_server import RedisServer
from tests.waiting import wait_until

SPEC = KVLayoutSpec("fp", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)
REC = WorkerRecord("d0", "decode", "127.0.0.1:1234", SPEC, 8, 128, epoch=7, ep_size=2)


class FakeWorker:
    def __init__(self) -> None:
        self.load = WorkerLoad(num_free_blocks=8)
        self.stored: list[int] = []
        self.evicted: list[int] = []
        self.calls = 0

    def snapshot(self):
        self.calls += 1
        out = (self.load, self.stored, self.evicted)
        self.stored, self.evicted = [], []
        return out


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def publisher(server, fake, record=REC, prefix="p", ttl_s: float = 1.0) -> WorkerPublisher:
    state = StateConfig(server.url, heartbeat_ttl_s=ttl_s, prefix=prefix)
    return WorkerPublisher(state, record, fake.snapshot, interval_s=0.05)


def test_publishes_registration_load_and_events(server):
    fake, prefix, ttl_s = FakeWorker(), uuid.uuid4().hex[:6], 2.0
    pub = publisher(server, fake, prefix=prefix, ttl_s=ttl_s)
    pub.start()
    registered_at = time.monotonic()
    view = RedisClusterState(server.url, prefix=prefix)
    [w] = view.workers("decode")
    assert (w.worker_id, w.epoch, w.ep_size, w.address) == ("d0", 7, 2, "127.0.0.1:1234")
    fake.load = WorkerLoad(num_free_blocks=5, num_running=2, expert_tokens=[1, 2, 3, 4])
    fake.stored = [11, 12, 13]
    wait_until(lambda: view.get("d0").load.num_running == 2 and view.match_prefix("d0", [11, 12]) == 2)  # fmt: skip
    registry = Registry(view, Metrics())  # a router in Redis mode: metrics from the state
    registry.publish_metrics(view.workers())
    text = registry.metrics.render().decode()
    assert 'pdserve_expert_rank_tokens{rank="1",worker="d0"} 7.0' in text
    assert 'pdserve_kv_blocks_in_use{worker="d0"} 3.0' in text
    fake.evicted = [12]
    wait_until(lambda: view.match_prefix("d0", [11, 12]) == 1)
    # Watched until two TTLs after registration (the TTL alone would have dropped it after
    # one): the heartbeats keep it listed all along.
    while time.monotonic() < registered_at + 2 * ttl_s:
        assert [w.worker_id for w in view.workers()] == ["d0"]
        time.sleep(0.05)  # polling cadence
    pub.stop()
    assert view.workers(healthy_only=False) == []


def test_redis_restart_re_registers_with_the_whole_prefix_set(server):
    fake, prefix = FakeWorker(), uuid.uuid4().hex[:6]
    pub = publisher(server, fake, prefix=prefix)
    pub.start()
    fake.stored = [1, 2]
    view = RedisClusterState(server.url, prefix=prefix)
    wait_until(lambda: view.match_prefix("d0", [1, 2]) == 2)
    server.stop()
    fake.stored, fake.evicted = [3], [1]  # while Redis is down: coalesced
    calls = fake.calls
    wait_until(lambda: fake.calls > calls + 2)  # the worker keeps going
    server.start()  # empty
    view = RedisClusterState(server.url, prefix=prefix)
    wait_until(lambda: view.get("d0") is not None and view.match_prefix("d0", [2, 3]) == 2)
    assert view.match_prefix("d0", [1]) == 0
    pub.stop()


def test_redis_emptied_between_two_beats_re_registers(server):
    """A Redis restarted faster than a beat (no call ever fails) must not leave the worker
    heartbeating with no registration: the beat finds it unknown and registers again."""
    fake, prefix = FakeWorker(), uuid.uuid4().hex[:6]
    pub = publisher(server, fake, prefix=prefix)
    pub.start()
    fake.stored = [1, 2]
    view = RedisClusterState(server.url, prefix=prefix)
    wait_until(lambda: view.match_prefix("d0", [1, 2]) == 2)
    server.client().flushall()  # what an empty restart leaves, with no outage to notice
    wait_until(lambda: view.get("d0") is not None and view.match_prefix("d0", [1, 2]) == 2)
    assert [w.worker_id for w in view.workers()] == ["d0"]
    pub.stop()


def test_mismatched_layout_is_refused_atomically(server):
    prefix = uuid.uuid4().hex[:6]
    first = publisher(server, FakeWorker(), prefix=prefix)
    first.start()
    odd = replace(REC, worker_id="d1", layout=replace(SPEC, block_size=8))
    with pytest.raises(LayoutRefused, match="block_size mismatch: cluster=4, d1=8"):
        publisher(server, FakeWorker(), odd, prefix=prefix).start()
    view = RedisClusterState(server.url, prefix=prefix)
    assert [w.worker_id for w in view.workers(healthy_only=False)] == ["d0"]
    assert "block_size mismatch" in view.refusals()["d1"]
    first.stop()


def test_new_epoch_replaces_the_old_incarnation(server):
    prefix = uuid.uuid4().hex[:6]
    old = publisher(server, (a := FakeWorker()), prefix=prefix)
    old.start()
    a.stored = [5]
    view = RedisClusterState(server.url, prefix=prefix)
    wait_until(lambda: view.match_prefix("d0", [5]) == 1)
    old._stop.set()  # killed: no deregistration
    new = publisher(server, FakeWorker(), replace(REC, epoch=8), prefix=prefix)
    new.start()
    assert view.get("d0").epoch == 8 and view.match_prefix("d0", [5]) == 0
    old.state.deregister("d0", 7)  # a late stop of the old incarnation leaves the new one
    assert view.get("d0").epoch == 8
    new.stop()
