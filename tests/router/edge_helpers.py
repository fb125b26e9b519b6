"""HTTP helpers for the router-edge tests: OpenAI error checks, raw sockets, polling."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx

from engine.config import CacheConfig, EngineConfig, WorkerConfig
from engine.worker.host import RunningWorker
from proto import worker_pb2 as pb
from router.launch.worker_main import start_worker

NUM_BLOCKS = 160
"""KV blocks per worker: 2560 tokens, more than the tiny model's 2048-token context."""


def start(role: str, model, interceptors=(), **kw) -> RunningWorker:
    """An in-process worker over real gRPC that can hold a whole context."""
    engine = EngineConfig(str(model), cache=CacheConfig(num_blocks=NUM_BLOCKS))
    config = WorkerConfig(role, engine, kv_transports=("tcp",), **kw)
    return start_worker(config, interceptors=interceptors)


def post(rt, path: str, body, timeout: float = 30, **kw) -> httpx.Response:
    return httpx.post(rt.url + path, json=body, timeout=timeout, **kw)


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    """``r`` is an OpenAI-shaped error with ``status`` whose message holds ``needles``."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    for needle in needles:
        assert needle in err["message"], err
    return err


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw_post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def raw_request(rt, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """Send exactly ``headers`` + ``body`` and read the whole answer (status, body text)."""
    lines = [f"POST {path} HTTP/1.1", "Host: t", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((rt.host, rt.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest.decode()


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    for line in head.splitlines():
        if line.startswith("content-length:"):
            return int(line.split(":")[1])
    return 1 << 30


def blocks(stub) -> tuple[int, int]:
    """(free, total) KV blocks of a worker."""
    st = stub.Stats(pb.StatsRequest(), timeout=5)
    return st.num_free_blocks, st.num_blocks
