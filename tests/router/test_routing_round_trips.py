"""One routing decision against a real redis-server: the router reads the cluster state in
one round trip (load, in-flight, health and the prompt's prefix scores together, the
worker registry itself refreshed in the background, never scanned per request), takes
its slot with one compare-and-increment, and no Redis I/O runs on the event loop thread.

Round trips are counted on the wire: every write of a packed request to a Redis socket
(a pipeline is one write), with the thread that made it."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from redis.connection import AbstractConnection

from engine.config import RouterConfig, StateConfig
from engine.kv_cache.hashing import hash_blocks
from engine.kv_cache.spec import KVLayoutSpec
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.job import Job
from router.metrics import Metrics
from router.policy import CostPolicy
from router.service import RouterService
from router.state.base import WorkerLoad, WorkerRecord
from router.state.redis import RedisClusterState
from router.state.registration import WorkerRedis
from router.workers import Registry
from tests.redis_server import RedisServer

SPEC = KVLayoutSpec("fp", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)
PROMPT = list(range(100, 120))  # 5 full blocks


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.close()


class Wire:
    """Every request written to a Redis socket while ``recording``: (thread, commands)."""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[tuple[str, list[str]]] = []
        self.recording = False
        real = AbstractConnection.send_packed_command

        def send(conn, command, check_health=True):
            if self.recording:
                self.sent.append((threading.current_thread().name, _names(command)))
            return real(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", send)


def _names(packed) -> list[str]:
    """The command names in a packed request (RESP arrays: ``*n``, ``$len``, the name)."""
    data = b"".join(bytes(p) for p in packed) if isinstance(packed, list) else bytes(packed)
    lines, out = data.split(b"\r\n"), []
    for i, line in enumerate(lines):
        if line.startswith(b"*") and i + 2 < len(lines):
            out.append(lines[i + 2].decode().upper())
    return out


def _cluster(server, prefix: str) -> None:
    """Two decode workers and a prefill worker registered and publishing, as their
    publishers do; d1 holds the prompt's first three blocks."""
    workers = WorkerRedis(StateConfig(server.url, prefix=prefix))
    for i, (wid, role) in enumerate([("d0", "decode"), ("d1", "decode"), ("p0", "prefill")]):
        record = WorkerRecord(wid, role, f"127.0.0.1:{1000 + i}", SPEC, 64, 128, epoch=7)
        workers.register(record)
        workers.publish_load(wid, 7, WorkerLoad(num_free_blocks=64, prefill_tokens_per_s=1e4))
        if wid == "d1":
            workers.publish_blocks(record, hash_blocks(PROMPT, 4)[:3], [])


def test_a_routing_decision_is_one_round_trip_off_the_event_loop(server, tiny_model, monkeypatch):
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    _cluster(server, prefix)
    state = RedisClusterState(server.url, prefix=prefix)
    registry = Registry(state, Metrics())
    model = str(tiny_model("llama"))
    service = RouterService(
        RouterConfig(model, "m"),
        state,
        registry,
        CostPolicy(),
        Metrics(),
        Tokenizer.from_dir(model),
    )
    wire = Wire(monkeypatch)
    job = Job("cmpl-1", PROMPT, SamplingParams(max_tokens=4), [])

    async def decide():
        await registry.discover()  # the background refresh (every poll interval)
        await service.io(state.reserve, "p0", 0)  # warm: Redis loads a script on first use
        wire.recording = True
        decision = await service.route(job)
        wire.recording = False
        return decision, threading.current_thread().name

    decision, loop_thread = asyncio.run(decide())
    assert (decision.decode.worker_id, decision.cached_blocks) == ("d1", 3)
    assert decision.path == "remote" and decision.prefill.worker_id == "p0"
    assert len(wire.sent) == 2, wire.sent  # the read, then the compare-and-increment
    (t1, read), (t2, reserve) = wire.sent
    assert read == [
        "HGETALL",
        "HGETALL",
        "MGET",
        "ZMSCORE",
        "ZMSCORE",
    ]  # load, in-flight, alive, 2 decodes
    assert reserve == ["EVALSHA"]
    assert t1 != loop_thread and t2 != loop_thread and t1.startswith("cluster-state")
    assert state.get("d1").inflight == 1  # the decision holds its slot
