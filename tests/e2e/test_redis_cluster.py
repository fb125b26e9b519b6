"""Shared cluster state in a real redis-server with real processes: 1 prefill + 2 decode
``pdserve worker --redis-url`` processes register and publish themselves; two routers (one
in-process HTTP server, one ``pdserve serve --router-only --redis-url`` process) discover
them from Redis only. Prefix-aware routing across routers (hits counted by the decode
workers' engines), a worker killed with SIGKILL and restarted (new epoch), redis-server
restarted mid-run, and a worker of another KV layout refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from engine.config.router import RouterConfig
from engine.kv_cache.hashing import hash_blocks
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.server import Router
from router.state.redis import RedisClusterState
from tests.decode_worker.inproc import spec
from tests.e2e.test_make_serve import BOUND
from tests.redis_server import RedisServer
from tests.waiting import wait_for_line, wait_until

ROOT = Path(__file__).resolve().parents[2]
TTL_S = 2.0  # workers' --heartbeat-ttl
LEAVE_MARGIN_S = 2.5  # a busy 2-core machine: Redis, the test and 3 workers share it
PREFIX_TOKENS = 64  # 4 blocks of 16
WORKERS = {"p0": "prefill", "d0": "decode", "d1": "decode"}


class Proc:
    """A ``pdserve`` subprocess with its log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "INFO", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "w") as err:
            self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def worker(model: Path, tmp: Path, url: str, wid: str, block_size: int = 16) -> Proc:
    """A ``pdserve worker`` on a port it picks itself (``ready`` reads its address)."""
    args = ["worker", "--role", WORKERS.get(wid, "prefill"), "--model", str(model)]
    args += ["--host", "127.0.0.1", "--port", "0", "--worker-id", wid]
    args += ["--num-kv-blocks", "64", "--block-size", str(block_size), "--kv-transport", "tcp"]
    args += ["--redis-url", url, "--heartbeat-ttl", str(TTL_S)]
    return Proc(args, tmp / f"{wid}-{time.monotonic_ns()}.log")


def ready(proc: Proc) -> str:
    line = proc.p.stdout.readline()
    assert "serving on" in line, f"{line!r}; log: {proc.log.read_text()[-2000:]}"
    return line.split()[-1]


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    model, tmp = tiny_model("llama"), tmp_path_factory.mktemp("redis-cluster")
    server = RedisServer().start()
    env = {"server": server, "model": model, "tmp": tmp, "procs": {}, "addr": {}}
    router_a = None
    try:
        for wid in WORKERS:
            env["procs"][wid] = worker(model, tmp, server.url, wid)
        for wid, proc in env["procs"].items():
            env["addr"][wid] = ready(proc)
        env["procs"]["router_b"] = b = Proc(
            ["serve", "--router-only", "--redis-url", server.url, "--model", str(model),
             "--served-model-name", "m", "--local-prefill-tokens", "16", "--host", "127.0.0.1",
             "--port", "0"],
            tmp / "router_b.log",
        )  # fmt: skip
        url_b = wait_for_line(b.log, BOUND, b.p, timeout=120).group(1)
        cfg = RouterConfig(str(model), "m", local_prefill_tokens=16)
        state = RedisClusterState(server.url, retry_s=0.3)
        router_a = Router(cfg, [], state=state, discover=True, poll_interval_s=0.2).start_in_thread()  # fmt: skip
        env["urls"] = [router_a.url, url_b]
        env["view"] = lambda: RedisClusterState(server.url)
        wait_until(lambda: _healthy(env["urls"][1]) == 3, timeout=90)
        wait_until(lambda: _healthy(env["urls"][0]) == 3)
        yield env
    finally:
        if router_a is not None:
            router_a.stop()
        for proc in env["procs"].values():
            proc.kill()
        server.close()


def _healthy(url: str) -> int:
    try:
        return sum(w["healthy"] for w in health(url)["workers"].values())
    except httpx.HTTPError:
        return 0


@pytest.fixture(autouse=True)
def _no_leaked_worker_blocks(cluster):
    yield
    for wid, address in cluster["addr"].items():
        cls = rpc.DecodeServiceStub if WORKERS[wid] == "decode" else rpc.PrefillServiceStub
        with grpc.insecure_channel(address) as channel:
            s = cls(channel)
            wait_until(lambda s=s: _all_free(s.Stats(pb.StatsRequest(), timeout=5)), timeout=10)


def _all_free(st) -> bool:
    return st.num_free_blocks == st.num_blocks and st.num_requests == 0


def complete(url: str, prompt: list[int]) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def direct(address: str, prefix: list[int]) -> None:
    """Generate on one decode worker over gRPC, bypassing every router."""
    with grpc.insecure_channel(address) as channel:
        req = spec(f"direct-{time.monotonic_ns()}", prefix + [1, 2])
        list(rpc.DecodeServiceStub(channel).Generate(req, timeout=30))


def cached(out: dict) -> int:
    """Prompt tokens the serving decode worker's engine found in its prefix cache."""
    return out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_workers_publish_prefix_events_and_routers_follow_them(cluster):
    """A prompt prefilled on d1 directly (no router involved) shows up in the Redis index
    from d1's own block-stored events; both routers then send that prefix to d1."""
    prefix = [300 + i % 70 for i in range(PREFIX_TOKENS)]
    direct(cluster["addr"]["d1"], prefix)
    view = cluster["view"]()
    wait_until(lambda: view.match_prefix("d1", hash_blocks(prefix, 16)) == 4, timeout=5)
    for i, url in enumerate(cluster["urls"]):
        assert cached(complete(url, prefix + [9, i, 9, 9, 9, 9, 9, 9])) == PREFIX_TOKENS


def test_two_routers_prefix_hit_rate(cluster):
    urls, hits, follow_ups = cluster["urls"], 0, 0
    for g in range(4):
        prefix = [100 + 37 * g + i % 50 for i in range(PREFIX_TOKENS)]
        for i in range(5):
            out = complete(urls[i % 2], prefix + [7 + i, 8 + g, 9, 10, 11, 12, 13, 14])
            if i:
                follow_ups += 1
                hits += cached(out) == PREFIX_TOKENS
    rate = hits / follow_ups
    logging.getLogger(__name__).info("prefix hit rate %.2f (%d/%d)", rate, hits, follow_ups)
    assert rate >= 0.9, f"prefix hit rate {hits}/{follow_ups}"
    for url in urls:
        h = health(url)
        assert h["cluster_state"]["connected"] is True
        assert {w: v["ep_size"] for w, v in h["workers"].items()} == dict.fromkeys(WORKERS, 1)


def test_restarted_router_loses_nothing(cluster):
    prefixes = [[200 + 29 * g + i % 40 for i in range(PREFIX_TOKENS)] for g in range(3)]
    for g, prefix in enumerate(prefixes):
        complete(cluster["urls"][0], prefix + [g, 1, 2, 3, 4, 5, 6, 7])
    cfg = RouterConfig(str(cluster["model"]), "m", local_prefill_tokens=16)
    fresh = Router(cfg, [], state=cluster["view"](), discover=True).start_in_thread()
    try:
        for g, prefix in enumerate(prefixes):
            assert cached(complete(fresh.url, prefix + [g, 9, 9, 9, 9, 9, 9, 9])) == PREFIX_TOKENS
    finally:
        fresh.stop()


def restart_d1(cluster, view, old_epoch: int) -> int:
    """Start d1 again (on whatever port it gets: routers find its new address in Redis);
    returns its new epoch once every router has it."""
    proc = worker(cluster["model"], cluster["tmp"], cluster["server"].url, "d1")
    cluster["procs"]["d1"] = proc
    cluster["addr"]["d1"] = address = ready(proc)
    wait_until(lambda: (w := view.get("d1")) is not None and w.healthy and w.epoch != old_epoch)
    new = view.get("d1").epoch
    assert view.get("d1").address == address
    for url in cluster["urls"]:
        wait_until(lambda url=url: health(url)["workers"]["d1"]["epoch"] == new)
    return new


def left_within_bound(took: float, ttl_s: float = TTL_S) -> None:
    """A killed worker leaves when the TTL of its last heartbeat lapses (the heartbeat is
    renewed every 0.25 s), not at its next failed request; load can only delay seeing it."""
    assert took <= ttl_s + LEAVE_MARGIN_S, f"left the candidate set after {took:.2f}s"


def test_killed_worker_leaves_and_rejoins_with_new_epoch(cluster):
    view, urls = cluster["view"](), cluster["urls"]
    old = view.get("d1").epoch
    cluster["procs"]["d1"].kill(signal.SIGKILL)  # no request meanwhile: the heartbeat alone
    took = wait_until(lambda: [w.worker_id for w in view.workers("decode")] == ["d0"])
    left_within_bound(took)
    logging.getLogger(__name__).info("killed worker left the candidate set in %.2fs", took)
    for i in range(4):
        complete(urls[i % 2], [5, 6, 7, i])
    restart_d1(cluster, view, old)
    prefix = [60 + i % 20 for i in range(PREFIX_TOKENS)]  # cached on the new d1 only
    direct(cluster["addr"]["d1"], prefix)
    wait_until(lambda: view.match_prefix("d1", hash_blocks(prefix, 16)) == 4, timeout=5)
    for i, url in enumerate(urls):  # both routers route to the new incarnation
        assert cached(complete(url, prefix + [i] * 8)) == PREFIX_TOKENS


def test_requests_routed_to_a_just_killed_worker_succeed(cluster):
    """Before its heartbeat lapses a dead worker is still a candidate: the first request
    sent there finds it unreachable, marks it down for every router and is routed again."""
    view, urls = cluster["view"](), cluster["urls"]
    prefix = [60 + i % 20 for i in range(PREFIX_TOKENS)]
    direct(cluster["addr"]["d1"], prefix)  # d1 holds it: requests go there
    wait_until(lambda: view.match_prefix("d1", hash_blocks(prefix, 16)) == 4, timeout=5)
    old = view.get("d1").epoch
    cluster["procs"]["d1"].kill(signal.SIGKILL)
    for i, url in enumerate(urls):
        assert complete(url, prefix + [7, i] * 4)["usage"]["completion_tokens"] == 3
    assert [w.worker_id for w in view.workers("decode")] == ["d0"]
    restart_d1(cluster, view, old)


def test_redis_restart_keeps_serving_and_resyncs(cluster):
    server, urls = cluster["server"], cluster["urls"]
    prefix = [400 + i % 30 for i in range(PREFIX_TOKENS)]
    complete(urls[0], prefix + [1] * 8)
    server.stop()
    for i in range(4):
        complete(urls[i % 2], [3, 1, 4, 1, 5, i])
    for url in urls:
        assert health(url)["cluster_state"]["connected"] is False
        assert "pdserve_cluster_state_connected 0.0" in httpx.get(url + "/metrics").text
    server.start()  # empty: no persistence
    for i in range(6):  # right after the restart too: no failed request
        complete(urls[i % 2], [2, 7, 1, 8, i])
    view = cluster["view"]()
    wait_until(lambda: len(view.workers()) == 3, timeout=10)
    # The workers republished their whole prefix sets into the empty Redis.
    holders = [w for w in ("d0", "d1") if view.match_prefix(w, hash_blocks(prefix, 16)) == 4]
    assert holders, {w: view.match_prefix(w, hash_blocks(prefix, 16)) for w in ("d0", "d1")}
    for url in urls:
        wait_until(lambda url=url: health(url)["cluster_state"]["connected"] is True)
        assert cached(complete(url, prefix + [2] * 8)) == PREFIX_TOKENS


def test_mismatched_layout_refused_with_reason(cluster, caplog):
    with caplog.at_level(logging.ERROR, logger="router.workers"):
        proc = worker(cluster["model"], cluster["tmp"], cluster["server"].url, "p32", block_size=32)  # fmt: skip
        assert proc.p.wait(120) == 2
        wait_until(lambda: "refused worker p32" in caplog.text, timeout=5)
    reason = "block_size mismatch: cluster=16, p32=32"
    assert reason in proc.log.read_text() and reason in caplog.text
    assert "p32" not in {w.worker_id for w in cluster["view"]().workers(healthy_only=False)}
