"""End-to-end fixtures: one local Ray per session, worker clusters as Ray actors, routers.

Clusters are launched once per session and shared across modules; routers (in-process
uvicorn threads speaking real HTTP to real gRPC workers) are cheap and made per mode.
After every test each worker must hold zero requests and have every KV block free.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest

from engine.config import CacheConfig, EngineConfig, ParallelConfig, WorkerConfig
from engine.config.router import RouterConfig
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.launch.ray_launcher import RayWorkers, start_ray
from router.server import Router, RouterThread

NUM_BLOCKS = 128
MODEL_NAME = "tiny"
TRANSPORTS = ("tcp", "shm", "ucx")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Logical CPUs only count actors: session-scoped clusters (one per arch) hold theirs
    # until the end, and module clusters start beside them.
    start_ray(None, "127.0.0.2", num_cpus=64)
    yield
    ray.shutdown()


@dataclass
class Cluster:
    model: Path
    workers: RayWorkers
    infos: dict[str, dict] = field(default_factory=dict)
    routers: list[RouterThread] = field(default_factory=list)

    def addresses(self, role: str | None = None) -> list[str]:
        return [i["address"] for i in self.infos.values() if role in (None, i["role"])]

    def refresh(self) -> None:
        self.infos = self.workers.wait_ready()

    def router(self, mode: str, **overrides) -> RouterThread:
        """``mode``: ``aggregated`` (decode workers only), a transport name, or ``ray``
        (workers found through their actors, so restarts are followed).

        The predicted-TTFT overload check is off unless a test sets it: the tests assert
        the path each request takes, and the bandwidth the router measures between tiny
        workers on a busy machine can make remote prefill look overloaded."""
        overrides.setdefault("prefill_overload_factor", 0.0)
        cfg = RouterConfig(
            str(self.model),
            MODEL_NAME,
            kv_transport=mode if mode in TRANSPORTS else "auto",
            **overrides,
        )
        if mode == "ray":
            source = self.workers.addresses
        else:
            source = self.addresses("decode" if mode == "aggregated" else None)
        rt = Router(cfg, source, poll_interval_s=0.25).start_in_thread()
        self.routers.append(rt)
        return rt

    def release(self, *routers: RouterThread) -> None:
        """Stop routers a module is done with: each polls every worker 4 times a second,
        and a session's worth of idle routers would load the machine."""
        for rt in routers:
            rt.stop()
            self.routers.remove(rt)

    def stubs(self):
        out = []
        for info in self.workers.wait_ready().values():
            channel = grpc.insecure_channel(info["address"])
            cls = rpc.DecodeServiceStub if info["role"] == "decode" else rpc.PrefillServiceStub
            out.append((cls(channel), channel))
        return out

    def wait_all_free(self, timeout: float = 10.0) -> None:
        stubs = self.stubs()
        try:
            deadline = time.monotonic() + timeout
            while True:
                stats = [s.Stats(pb.StatsRequest(), timeout=5) for s, _ in stubs]
                if all(st.num_free_blocks == st.num_blocks and not st.num_requests for st in stats):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"KV blocks still held after {timeout}s: {stats}")
                time.sleep(0.05)
        finally:
            for _, channel in stubs:
                channel.close()

    def stop(self) -> None:
        for rt in self.routers:
            rt.stop()
        self.workers.shutdown()


def worker_config(model: Path, transports=TRANSPORTS, ep_size: int = 1, **kw) -> WorkerConfig:
    """The config the test clusters' Ray workers get (each launch sets its role and id)."""
    engine = EngineConfig(
        str(model), cache=CacheConfig(num_blocks=NUM_BLOCKS), parallel=ParallelConfig(ep_size)
    )
    return WorkerConfig("decode", engine, kv_transports=tuple(transports), **kw)


def launch(model: Path, prefix: str, prefill: int = 1, decode: int = 1, **kw) -> Cluster:
    """``kw``: WorkerConfig fields (``state=StateConfig(...)`` for Redis)."""
    config = worker_config(model, **kw)
    workers = RayWorkers()
    workers.launch("prefill", prefill, config, prefix=prefix)
    workers.launch("decode", decode, config, prefix=prefix)
    cluster = Cluster(model, workers)
    cluster.refresh()
    return cluster


class Clusters:
    """``clusters(arch)``: a shared 1 prefill + 1 decode cluster for that tiny model."""

    def __init__(self, tiny_model) -> None:
        self._tiny_model = tiny_model
        self.made: dict[str, Cluster] = {}

    def __call__(self, arch: str) -> Cluster:
        if arch not in self.made:
            self.made[arch] = launch(self._tiny_model(arch), prefix=f"{arch}-")
        return self.made[arch]


@pytest.fixture(scope="session")
def clusters(ray_session, tiny_model):
    made = Clusters(tiny_model)
    yield made
    for cluster in made.made.values():
        cluster.stop()


API_MODES = ("aggregated", "tcp", "shm")
"""The modes the API feature modules run every case in: local, and both disaggregated
transports the tiny cluster always has."""


@pytest.fixture(scope="module")
def mode_routers(clusters):
    """One router per ``API_MODES`` mode on the llama cluster for one module, stopped
    after it (idle routers poll every worker)."""
    llama = clusters("llama")
    made = {mode: llama.router(mode) for mode in API_MODES}
    yield made
    llama.release(*made.values())


@pytest.fixture(autouse=True)
def _no_leaked_blocks(request):
    """After every test, every worker of every shared cluster holds nothing."""
    yield
    if "clusters" in request.fixturenames:
        for cluster in request.getfixturevalue("clusters").made.values():
            cluster.wait_all_free()


def client(rt: RouterThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=rt.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw
    )


def completion_text(c: openai.OpenAI, stream: bool, **kw) -> tuple[str, str]:
    """One completion's ``(text, finish_reason)``, streamed or whole."""
    if not stream:
        choice = c.completions.create(**kw).choices[0]
        return choice.text, choice.finish_reason
    chunks = list(c.completions.create(stream=True, **kw))
    return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
