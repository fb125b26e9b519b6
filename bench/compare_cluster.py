"""bench.compare's clusters: each setup's Ray workers (pinned, nice 0) and its router process,
and what a router's ``/metrics`` says about the KV and the disaggregated hops.

A setup may share another's workers with a router of its own (``Setup.shares``): the
serial-reservation router of the A/B drives the disaggregated setup's workers, one request
at a time during calibration, so the two never compete.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger("bench.compare")
MODEL_NAME = "tiny"
HOPS = ("reserve", "prefill_queue", "prefill_compute", "transfer_tail", "decode_admission")


@dataclass(frozen=True)
class Setup:
    name: str
    prefill: int
    decode: int
    shares: str | None = None
    """Another setup whose workers this one's router drives (it launches none)."""
    router_args: tuple[str, ...] = ()


def pin(pid: int, core: int) -> bool:
    """Pin every thread of ``pid`` to ``core`` at nice 0; False where the OS refuses.

    Ray starts workers at nice 15, below the router and this load generator (nice 0), so
    on a busy CPU box they would be starved first; the A/B gives them normal priority.
    """
    if not hasattr(os, "sched_setaffinity") or core >= (os.cpu_count() or 1):
        return False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {core})
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, ValueError) as exc:
        logger.warning("cannot pin pid %d to core %d: %s", pid, core, exc)
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One setup's Ray workers (pinned) and its router subprocess."""

    def __init__(self, setup: Setup, model: str, workers) -> None:
        self.setup, self.model, self.workers = setup, model, workers
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def prefix(self) -> str:
        return f"{self.setup.shares or self.setup.name}-"

    def launch(self, settings) -> None:
        if self.setup.shares is None:
            self.workers.launch("prefill", self.setup.prefill, settings, prefix=self.prefix)
            self.workers.launch("decode", self.setup.decode, settings, prefix=self.prefix)

    def start_router(self, log_dir: Path) -> None:
        infos = [i for w, i in self.workers.wait_ready().items() if w.startswith(self.prefix)]
        for core, info in enumerate(sorted(infos, key=lambda i: i["worker_id"])):
            if self.setup.shares is None:
                pinned = pin(info["pid"], core)
                logger.info("%s: %s pid %d%s", self.setup.name, info["worker_id"], info["pid"],
                            f" pinned to core {core}" if pinned else " (not pinned)")  # fmt: skip
        port = free_port()
        cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "WARNING", "serve",
               "--model", self.model, "--served-model-name", MODEL_NAME, "--port", str(port),
               *self.setup.router_args]  # fmt: skip
        for info in infos:
            cmd += ["--worker", info["address"]]
        self.log = log_dir / f"router-{self.setup.name}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        self.expected = len(infos)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.setup.name} router exited; see {self.log}")
            try:
                workers = httpx.get(self.url + "/health", timeout=2).json().get("workers", {})
                if sum(w["healthy"] for w in workers.values()) == self.expected:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.setup.name} router not ready in {timeout_s}s; see {self.log}")

    def counters(self) -> dict[str, float]:
        """The router's KV counters and hop histograms' sums and counts, as of now."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        get = lambda pattern: sum(float(v) for v in re.findall(pattern, text, re.M))  # noqa: E731
        out = {"kv_bytes": get(r"^pdserve_kv_transfer_bytes_total (\S+)$"),
               "kv_seconds": get(r"^pdserve_kv_transfer_seconds_total (\S+)$")}  # fmt: skip
        for hop in HOPS:
            for kind in ("sum", "count"):
                out[f"{hop}_{kind}"] = get(rf'^pdserve_disagg_hop_seconds_{kind}{{hop="{hop}"}} (\S+)$')  # fmt: skip
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def hop_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean milliseconds of each hop between two ``counters()`` reads (None: no sample)."""
    out = {}
    for hop in HOPS:
        n = after[f"{hop}_count"] - before[f"{hop}_count"]
        out[hop] = 1e3 * (after[f"{hop}_sum"] - before[f"{hop}_sum"]) / n if n else None
    return out


def start_clusters(setups, model: str, log_dir: Path) -> tuple[dict[str, Cluster], object]:
    from engine.config import EngineConfig, WorkerConfig
    from router.launch.ray_launcher import RayWorkers, start_ray

    start_ray(None, "127.0.0.2", num_cpus=8)
    workers = RayWorkers()
    # device auto: each worker's node resolves it; launch() sets each worker's role
    settings = WorkerConfig("decode", EngineConfig(model, device="auto"), kv_transports=("tcp", "shm"))  # fmt: skip
    clusters = {s.name: Cluster(s, model, workers) for s in setups}
    for c in clusters.values():
        c.launch(settings)
    for c in clusters.values():
        c.start_router(log_dir)
    for c in clusters.values():
        c.wait_ready()
    return clusters, workers
