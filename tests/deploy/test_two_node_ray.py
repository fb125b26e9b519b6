"""Two Ray nodes on one machine, started by deploy/ray/start-head.sh (role prefill, on
127.0.0.2) and start-worker.sh (role decode, on 127.0.0.3); deploy/ray/launch.sh starts
`pdserve serve --ray-address`, which puts the prefill worker on the head and the decode
worker on the other node; a request then succeeds end to end. A second router naming the
same `--ray-namespace` shares those workers and keeps serving after the first one stops.
Authenticated as the scripts are by default: credentials from deploy/ray/make-secrets.sh,
Ray with token auth, every worker gRPC call proving the cluster secret (a call without
it is refused).

Everything runs in subprocesses on its own ports and temp dirs, never touching the Ray
instance other tests use: each node is a `ray start --block` in its own session, and the
cleanup kills exactly the processes of those sessions.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
SPAN = 64  # ports used from a base port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 29000, SPAN)
        if all(_free(base + i) for i in range(SPAN)):
            return base
    raise RuntimeError("no free block of ports in 20000-29000")


def node_args(base: int, ip: str, temp_dir: Path) -> list[str]:
    """`ray start` flags that keep one node on its own address, ports and temp dir."""
    return [
        "--node-ip-address", ip,
        "--temp-dir", str(temp_dir),
        "--num-cpus", "2",
        "--object-store-memory", str(96 * 1024 * 1024),
        "--disable-usage-stats",
        "--node-manager-port", str(base),
        "--object-manager-port", str(base + 1),
        "--dashboard-agent-listen-port", str(base + 2),
        "--dashboard-agent-grpc-port", str(base + 3),
        "--metrics-export-port", str(base + 4),
        "--runtime-env-agent-port", str(base + 5),
        "--min-worker-port", str(base + 8),
        "--max-worker-port", str(base + 23),
        "--block",
    ]  # fmt: skip


class Sessions:
    """Processes started in their own sessions; stop() kills every process in them."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            assert self.procs[name].poll() is None, self.logs()
            assert time.monotonic() < deadline, f"{name}: no {text!r} in {timeout}s\n{self.logs()}"
            time.sleep(0.2)

    def interrupt(self, name: str, timeout: float) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        """SIGTERM each session's leader group, then SIGKILL whatever is left in the session
        (Ray's workers run in process groups of their own, but stay in the session)."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # idle nodes would drain for 30 s; no need
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.1)
        for proc in self.procs.values():
            for pid in _session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.wait(5)


def _session_members(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(480)  # generous: Ray starts slowly on an overloaded host
def test_serve_places_prefill_and_decode_on_their_own_nodes(tiny_model, tmp_path):
    base = port_base()
    gcs = f"{HEAD_IP}:{base}"
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("RAY_ADDRESS", None)
    secrets = tmp_path / "secrets"  # the scripts authenticate Ray and the workers with it
    subprocess.run([str(RAY_DIR / "make-secrets.sh"), str(secrets)], check=True, capture_output=True)  # fmt: skip
    env["PDSERVE_SECRETS_DIR"] = str(secrets)
    # short: Ray's unix socket paths under the temp dir must stay under 108 characters
    temp = Path(tempfile.mkdtemp(prefix="pd2n", dir="/tmp"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, temp, ignore_errors=True)
        nodes = Sessions(tmp_path, env)
        stack.callback(nodes.stop)
        head_args = node_args(base + 8, HEAD_IP, temp / "h") + [
            "--ray-client-server-port", str(base + 1),
            "--dashboard-port", str(base + 2),
            "--include-dashboard", "false",
        ]  # fmt: skip
        nodes.start("head", [str(RAY_DIR / "start-head.sh"), "--port", str(base), "--role", "prefill", "--gpus", "0", "--", *head_args])  # fmt: skip
        nodes.wait_for("head", "Ray runtime started", 150)
        worker_args = node_args(base + 32, WORKER_IP, temp / "w")
        nodes.start("worker", [str(RAY_DIR / "start-worker.sh"), "--role", "decode", "--address", gcs, "--gpus", "0", "--", *worker_args])  # fmt: skip
        nodes.wait_for("worker", "Ray runtime started", 150)

        def serve(name: str) -> str:
            nodes.start(
                name,
                [
                    str(RAY_DIR / "launch.sh"),
                    "--ray-address",
                    gcs,
                    "--prefill",
                    "1",
                    "--decode",
                    "1",
                    "--kv-transport",
                    "tcp",
                    "--",
                    "--model",
                    str(tiny_model("llama")),
                    "--served-model-name",
                    "tiny",
                    "--num-kv-blocks",
                    "64",
                    "--port",
                    "0",
                    "--ray-namespace",
                    "t2n",
                ],
            )  # fmt: skip  (the router binds a free port and logs it)
            nodes.wait_for(name, "pdserve ready in", 120)
            return re.search(r"router bound to (http://[^;]+);", nodes.log(name)).group(1)

        first = serve("serve")
        workers = httpx.get(first + "/health", timeout=5).json()["workers"]
        hosts = {w["role"]: w["address"].rsplit(":", 1)[0] for w in workers.values()}
        assert hosts == {"prefill": HEAD_IP, "decode": WORKER_IP}, workers
        assert "authenticated (cluster secret)" in nodes.log("serve")
        _assert_refused_without_the_secret(workers)
        complete(first)
        metrics = httpx.get(first + "/metrics", timeout=5).text
        assert _remote_prefills(metrics) >= 1, metrics

        # a second router naming the same Ray namespace shares the workers, and keeps
        # them when the first one stops
        second = serve("serve2")
        assert httpx.get(second + "/health", timeout=5).json()["workers"] == workers
        nodes.interrupt("serve", 30)  # Ctrl-C
        assert nodes.procs["serve"].poll() is not None, nodes.logs()
        complete(second)
        nodes.interrupt("serve2", 30)


def _assert_refused_without_the_secret(workers: dict) -> None:
    import grpc

    from proto import worker_pb2 as pb
    from proto import worker_pb2_grpc as rpc

    for w in workers.values():
        cls = rpc.DecodeServiceStub if w["role"] == "decode" else rpc.PrefillServiceStub
        with grpc.insecure_channel(w["address"]) as channel:
            with pytest.raises(grpc.RpcError) as info:
                cls(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, w


def complete(url: str) -> None:
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def _remote_prefills(metrics: str) -> float:
    """Requests prefilled on the prefill worker (not locally on decode), from /metrics."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("pdserve_routing_decisions_total{") and 'path="remote"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
