"""Redis mode: a worker heartbeats only while its engine loop serves. A real in-process
decode worker publishing to a real redis-server leaves the routers' candidate set within
the heartbeat TTL once its loop dies (the process is still up: its exit is replaced by a
test hook) or stalls, and rejoins when a stalled loop moves again."""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.commands import Generate
from engine.sampling_params import SamplingParams
from engine.worker.sink import Sink
from router.state.redis import RedisClusterState
from tests.decode_worker.inproc import start
from tests.e2e.inproc_cluster import Exits, kill_loop, stall_loop, wait_until
from tests.redis_server import RedisServer

TTL_S = 1.0


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


def test_security_dead_loop_stops_the_heartbeat(server, tiny_model, monkeypatch):
    exits = Exits(monkeypatch)
    worker = start("decode", tiny_model("llama"), redis_url=server.url, heartbeat_ttl_s=TTL_S)
    view = RedisClusterState(server.url)
    try:
        wait_until(lambda: [w.worker_id for w in view.workers()] == ["decode-t"], 10, "registered")
        kill_loop(worker, monkeypatch)
        took = wait_until(lambda: not view.workers(), TTL_S + 2.0, "heartbeat stopped")
        assert took <= TTL_S + 2.0
        wait_until(lambda: exits.codes == [1], 10, "asked to exit 1")
    finally:
        worker.stop()


def test_security_stalled_loop_stops_the_heartbeat_until_it_moves(server, tiny_model, monkeypatch):  # fmt: skip
    worker = start(
        "decode", tiny_model("llama"), redis_url=server.url, heartbeat_ttl_s=TTL_S,
        stall_timeout_s=0.5,
    )  # fmt: skip
    view = RedisClusterState(server.url)
    try:
        wait_until(lambda: len(view.workers()) == 1, 10, "registered")
        release = stall_loop(worker, monkeypatch)
        sink = Sink(asyncio.new_event_loop())  # nobody reads it: the step never ends
        worker.worker.loop.submit(Generate("stuck", [5, 6, 7], SamplingParams(max_tokens=2), sink))
        wait_until(lambda: not view.workers(), TTL_S + 3.0, "stalled worker dropped")
        release.set()
        wait_until(lambda: len(view.workers()) == 1, 10, "rejoined")
    finally:
        worker.stop()
