"""Authenticated internal planes and secrets that stay secret, with real processes: a
password-protected redis-server, one prefill and one decode ``pdserve worker`` started with
``--cluster-secret-file`` (the decode worker reads the Redis password from
``--redis-password-file``, the prefill worker has it in its ``--redis-url``), and a router
(real HTTP) that discovers them in Redis through a URL carrying the password.

- a gRPC call without the cluster secret's token is refused (UNAUTHENTICATED), including
  a Prefill whose ticket names an arbitrary endpoint; the router's calls are served and
  its disaggregated greedy output equals HF token for token;
- the Redis password appears in neither ``/health``, ``/metrics``, the router's logs nor
  the workers' logs;
- a malformed entry in the Redis ``workers`` hash is skipped: requests still get 200.
"""

from __future__ import annotations

import logging
import uuid

import grpc
import httpx
import pytest

from engine.config.router import RouterConfig
from engine.grpc_auth import call_metadata
from engine.security import ClusterSecret
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.server import Router
from router.state.redis import RedisClusterState
from tests.decode_worker.inproc import spec
from tests.e2e.test_redis_cluster import Proc, ready, wait_until
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.redis_server import RedisServer

PASSWORD = "redis-pw-" + uuid.uuid4().hex
SECRET = "cluster-" + uuid.uuid4().hex
SERVICES = {"decode": "/pdserve.worker.DecodeService", "prefill": "/pdserve.worker.PrefillService"}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _worker(model, tmp, role: str, wid: str, redis_args: list[str], secret_file) -> Proc:
    args = ["worker", "--role", role, "--model", str(model), "--host", "127.0.0.1", "--port", "0"]
    args += ["--worker-id", wid, "--num-kv-blocks", "64", "--kv-transport", "tcp"]
    args += ["--cluster-secret-file", str(secret_file), *redis_args]
    return Proc(args, tmp / f"{wid}.log")


@pytest.fixture(scope="module")
def secure(tiny_model, tmp_path_factory):
    model, tmp = tiny_model("llama"), tmp_path_factory.mktemp("security")
    (tmp / "secret").write_text(SECRET + "\n")
    (tmp / "redis-pw").write_text(PASSWORD + "\n")
    server = RedisServer(password=PASSWORD).start()
    with_pw = server.url.replace("://", f"://:{PASSWORD}@")
    capture, root = _Capture(), logging.getLogger()
    ours = [logging.getLogger(n) for n in ("router", "engine", "kv_transfer", "pdserve")]
    levels = [lg.level for lg in ours]
    root.addHandler(capture)
    for lg in ours:
        lg.setLevel(logging.DEBUG)
    env = {"server": server, "model": model, "procs": {}, "addr": {}, "logs": capture}
    router = None
    try:
        env["procs"]["p0"] = _worker(model, tmp, "prefill", "p0", ["--redis-url", with_pw], tmp / "secret")  # fmt: skip
        env["procs"]["d0"] = _worker(model, tmp, "decode", "d0", ["--redis-url", server.url, "--redis-password-file", str(tmp / "redis-pw")], tmp / "secret")  # fmt: skip
        for wid, proc in env["procs"].items():
            env["addr"][wid] = ready(proc)
        cfg = RouterConfig(str(model), "m")
        state = RedisClusterState(with_pw, retry_s=0.3)
        secret = ClusterSecret(SECRET.encode())
        router = Router(cfg, [], state=state, discover=True, poll_interval_s=0.2, secret=secret)
        env["router"] = router = router.start_in_thread()
        wait_until(lambda: len(state.workers()) == 2, timeout=60)
        yield env
    finally:
        root.removeHandler(capture)
        for lg, level in zip(ours, levels, strict=True):
            lg.setLevel(level)
        if router is not None:
            router.stop()
        for proc in env["procs"].values():
            proc.kill()
        server.close()


def _stub(secure, wid: str):
    role = "prefill" if wid.startswith("p") else "decode"
    channel = grpc.insecure_channel(secure["addr"][wid])
    cls = rpc.PrefillServiceStub if role == "prefill" else rpc.DecodeServiceStub
    return cls(channel), channel, SERVICES[role]


@pytest.fixture(autouse=True)
def _no_leaked_blocks(secure):
    yield
    secret = ClusterSecret(SECRET.encode())
    for wid in secure["addr"]:
        s, channel, service = _stub(secure, wid)

        def free(s=s, service=service) -> bool:
            md = call_metadata(secret, f"{service}/Stats")
            st = s.Stats(pb.StatsRequest(), timeout=5, metadata=md)
            return st.num_free_blocks == st.num_blocks and st.num_requests == 0

        with channel:
            wait_until(free, timeout=10)


def _code(call) -> grpc.StatusCode:
    try:
        result = call()
        if not isinstance(result, pb.InfoResponse | pb.PrefillResponse):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_security_unauthenticated_grpc_to_real_workers_is_refused(secure):
    d, dch, _ = _stub(secure, "d0")
    p, pch, _ = _stub(secure, "p0")
    with dch, pch:
        assert _code(lambda: d.Info(pb.InfoRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: d.Generate(spec("x", [5, 6, 7]), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
        # a ticket naming any endpoint would make the prefill worker stream KV there
        ticket = pb.TransferTicket(transfer_id="t", endpoint="10.9.9.9:1", block_ids=[0], epoch=1)
        forged = pb.PrefillRequest(request=spec("y", [5, 6, 7]), ticket=ticket)
        assert _code(lambda: p.Prefill(forged, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        wrong = call_metadata(ClusterSecret(b"not-the-cluster-secret"), f"{SERVICES['decode']}/Info")  # fmt: skip
        assert _code(lambda: d.Info(pb.InfoRequest(), timeout=5, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip


def test_security_authenticated_router_serves_hf_exact_disaggregated(secure):
    router, model = secure["router"], secure["model"]
    prompts = make_prompts([40, 23], seed=91)
    want = hf_greedy(model, prompts, 8)
    for prompt, expected in zip(prompts, want, strict=True):
        assert _complete(router.url, prompt) == expected
    metrics = httpx.get(router.url + "/metrics", timeout=10).text
    remote = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("pdserve_routing_decisions_total{") and 'path="remote"' in line)  # fmt: skip
    assert remote >= 2, metrics  # Reserve, Prefill and Decode all went through the auth


def test_security_redis_password_absent_from_health_metrics_and_logs(secure):
    url = secure["router"].url
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200
    assert PASSWORD not in health.text and ":***@" in health.json()["cluster_state"]["url"]
    assert PASSWORD not in httpx.get(url + "/metrics", timeout=10).text
    router_logs = "\n".join(secure["logs"].lines)
    assert "discovered" in router_logs  # the capture saw the router at work
    assert PASSWORD not in router_logs and SECRET not in router_logs
    for wid, proc in secure["procs"].items():
        text = proc.log.read_text()
        assert "registered in" in text, text[-2000:]  # the publisher logged its Redis URL
        assert PASSWORD not in text and SECRET not in text, wid
    assert "carries a password" in secure["procs"]["p0"].log.read_text()  # and says what to do


def test_security_malformed_workers_entry_does_not_500(secure):
    r = secure["server"].client()
    r.hset("pdserve:workers", mapping={"evil": "not json", "evil2": '{"role": "decode"}'})
    r.hset("pdserve:load", "d0", "{broken")
    try:
        prompt = make_prompts([30], seed=93)[0]
        assert _complete(secure["router"].url, prompt) == hf_greedy(secure["model"], [prompt], 8)[0]  # fmt: skip
        assert httpx.get(secure["router"].url + "/health", timeout=10).status_code == 200
    finally:
        r.hdel("pdserve:workers", "evil", "evil2")


def _complete(url: str, prompt: list[int]) -> list[int]:
    body = {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]
