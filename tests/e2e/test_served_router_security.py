"""`pdserve serve` as a user runs it (real processes: a standalone decode worker and the
router): the API key comes from a file and never shows in the process list, the ready
line names the bound port (--port 0), and SIGTERM with a stalled stream in flight ends
the router within its graceful-shutdown timeout with the request aborted on the worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from tests.engine.hf_reference import hf_greedy, make_prompts

PDSERVE = [sys.executable, "-m", "router.launch.cli"]
KEY = "k3y-from-a-file"


def wait_for_line(proc: subprocess.Popen, log: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{log.read_text()}")


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PDSERVE_API_KEY", None)
    return subprocess.Popen(PDSERVE + args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip


@pytest.fixture
def served(tiny_model, tmp_path):
    model = str(tiny_model("llama"))
    worker = spawn(
        ["worker", "--role", "decode", "--model", model, "--host", "127.0.0.1", "--num-kv-blocks", "160"],
        tmp_path / "w.log",
    )  # fmt: skip
    procs = [worker]
    try:
        address = wait_for_line(worker, tmp_path / "w.log", r"serving on (\S+)", 120)[1]
        (tmp_path / "key").write_text(KEY + "\n")
        router = spawn(
            ["serve", "--model", model, "--worker", address, "--port", "0",
             "--api-key-file", str(tmp_path / "key"), "--graceful-shutdown-timeout", "1"],
            tmp_path / "r.log",
        )  # fmt: skip
        procs.append(router)
        url = wait_for_line(router, tmp_path / "r.log", r"ready in \S+ \(\w+\): (http://\S+)/v1", 120)[1]  # fmt: skip
        yield {"url": url, "router": router, "worker": address, "model": model}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)


def worker_stats(address: str) -> pb.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return rpc.DecodeServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)


def test_security_served_router_api_key_file_and_sigterm_drain(served):
    url, router = served["url"], served["router"]
    cmdline = Path(f"/proc/{router.pid}/cmdline").read_bytes()
    assert KEY.encode() not in cmdline and b"--api-key-file" in cmdline
    prompt = make_prompts([11], seed=81)[0]
    body = {"model": "llama", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
    assert r.json()["choices"][0]["token_ids"] == hf_greedy(served["model"], [prompt], 6)[0]
    # A stream whose client never reads holds the router's send; SIGTERM must not wait on it.
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        stream = json.dumps(
            {
                "model": "llama",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_completion_tokens": 2000,
                "ignore_eos": True,
                "logprobs": True,
                "top_logprobs": 20,
            }
        ).encode()  # fmt: skip: about 3 MB of SSE, more than the socket buffers hold
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(stream)}\r\n\r\n"  # fmt: skip
        sock.sendall(head.encode() + stream)
        deadline = time.monotonic() + 30
        while worker_stats(served["worker"]).num_requests == 0:
            assert time.monotonic() < deadline, "the stream never reached the worker"
            time.sleep(0.05)
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while (st := worker_stats(served["worker"])).num_requests or st.num_free_blocks != st.num_blocks:  # fmt: skip
            assert time.monotonic() < deadline, f"the worker still holds the stream: {st}"
            time.sleep(0.05)
    finally:
        sock.close()
