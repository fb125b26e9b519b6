"""In-process workers over real gRPC (no Ray) for worker-level tests."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, StateConfig, WorkerConfig
from engine.sampling_params import SamplingParams
from engine.security import ClusterSecret
from engine.worker.convert import params_to_pb
from engine.worker.host import RunningWorker
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.launch.worker_main import start_worker

NUM_BLOCKS = 64
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def start(
    role: str,
    model: Path,
    *,
    transports=("tcp",),
    block_size: int = 16,
    chunk: int = 2048,
    device: str = "cpu",
    dtype: str = "auto",
    secret: ClusterSecret | None = None,
    interceptors=(),
    **kw,
) -> RunningWorker:
    """``kw``: WorkerConfig fields, plus ``redis_url`` / ``heartbeat_ttl_s`` (its state);
    ``secret`` reaches the worker as a file, as in production."""
    engine = EngineConfig(
        str(model),
        dtype=dtype,
        device=device,
        cache=CacheConfig(block_size=block_size, num_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_batched_tokens=chunk),
    )
    kw.setdefault("worker_id", f"{role}-t")
    if "redis_url" in kw:
        ttl = kw.pop("heartbeat_ttl_s", StateConfig.heartbeat_ttl_s)
        kw["state"] = StateConfig(redis_url=kw.pop("redis_url"), heartbeat_ttl_s=ttl)
    if secret is not None:
        kw["cluster_secret_file"] = secret_file(secret)
    config = WorkerConfig(role, engine, kv_transports=tuple(transports), **kw)
    return start_worker(config, interceptors=interceptors)


def secret_file(secret: ClusterSecret) -> str:
    """A file holding ``secret`` (removed when the test process ends)."""
    f = tempfile.NamedTemporaryFile("wb", prefix="pdserve-secret-", delete=False)
    f.write(secret.key)
    f.close()
    return f.name


def stub(worker: RunningWorker):
    channel = grpc.insecure_channel(worker.address)
    cls = rpc.DecodeServiceStub if worker.config.role == "decode" else rpc.PrefillServiceStub
    return cls(channel), channel


@contextlib.contextmanager
def serving(workers: list[RunningWorker]) -> Iterator[list]:
    """A gRPC stub per worker (``stub``); on exit the channels close and the workers stop."""
    stubs = [stub(w) for w in workers]
    try:
        yield [s for s, _ in stubs]
    finally:
        for (_, channel), w in zip(stubs, workers, strict=True):
            channel.close()
            w.stop()


def spec(rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> pb.RequestSpec:
    return pb.RequestSpec(request_id=rid, prompt_token_ids=prompt, params=params_to_pb(params))


def tokens(chunks) -> list[int]:
    return [t.token_id for c in chunks for t in c.tokens]


def wait_all_free(stubs, timeout: float = 5.0) -> None:
    """Every worker's blocks are back in its pool within ``timeout`` (no leak)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [s.Stats(pb.StatsRequest()) for s in stubs]
        if all(st.num_free_blocks == st.num_blocks and st.num_requests == 0 for st in stats):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held after {timeout}s: {stats}")
        time.sleep(0.02)
