"""Worker gRPC authentication (engine/grpc_auth.py) against a real in-process decode worker
started with a cluster secret: every RPC without a valid per-call token is refused with
UNAUTHENTICATED before it touches the engine (no block reserved, nothing generated); the
router's aio client with the secret is served."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from engine.grpc_auth import METADATA_KEY, call_metadata, make_token
from engine.security import ClusterSecret
from proto import worker_pb2 as pb
from router.workers import WorkerClient, fetch_info
from tests.engine.hf_reference import hf_greedy, make_prompts

from .inproc import NUM_BLOCKS, spec, start, stub, tokens, wait_all_free

SECRET = ClusterSecret(b"0123456789abcdef-test-secret")
OTHER = ClusterSecret(b"fedcba9876543210-other-secret")
SERVICE = "/pdserve.worker.DecodeService"


@pytest.fixture(scope="module")
def worker(tiny_model):
    w = start("decode", tiny_model("llama"), secret=SECRET, worker_id="auth-d")
    s, channel = stub(w)
    yield w, s
    channel.close()
    w.stop()


def _refused(call, *args, **kw) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kw)
        if not isinstance(result, pb.InfoResponse | pb.StatsResponse | pb.ReserveResponse | pb.AbortResponse):  # fmt: skip
            list(result)  # a stream raises on its first read
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    return info.value.details()


def _md(method: str, secret: ClusterSecret = SECRET, now: float | None = None):
    return ((METADATA_KEY, make_token(secret, f"{SERVICE}/{method}", now)),)


def test_security_unauthenticated_calls_are_refused(worker):
    w, s = worker
    why = _refused(s.Info, pb.InfoRequest(), timeout=5)
    assert "--cluster-secret-file" in why  # the refusal names the fix
    _refused(s.Stats, pb.StatsRequest(), timeout=5)
    _refused(s.Health, pb.HealthRequest(), timeout=5)
    _refused(s.Abort, pb.AbortRequest(request_id="someone-else"), timeout=5)
    _refused(s.Generate, spec("nope", [5, 6, 7]), timeout=5)
    req = pb.ReserveRequest(request=spec("grab", list(range(5, 200))), kv_transport="tcp", lease_s=30)  # fmt: skip
    _refused(s.Reserve, req, timeout=5)
    stats = s.Stats(pb.StatsRequest(), timeout=5, metadata=_md("Stats"))
    assert stats.num_free_blocks == stats.num_blocks == NUM_BLOCKS  # nothing was reserved
    assert stats.num_requests == 0


def test_security_forged_expired_replayed_and_moved_tokens_are_refused(worker):
    _, s = worker
    assert "secret differs" in _refused(s.Info, pb.InfoRequest(), metadata=_md("Info", OTHER))
    old = time.time() - 600
    assert "clock" in _refused(s.Info, pb.InfoRequest(), metadata=_md("Info", now=old))
    assert "malformed" in _refused(s.Info, pb.InfoRequest(), metadata=((METADATA_KEY, "v1:1:2:3"),))  # fmt: skip
    stats_token = _md("Stats")
    assert "secret differs" in _refused(s.Info, pb.InfoRequest(), metadata=stats_token)
    ok = _md("Info")
    assert s.Info(pb.InfoRequest(), timeout=5, metadata=ok).worker_id == "auth-d"
    assert "replayed" in _refused(s.Info, pb.InfoRequest(), metadata=ok)


def test_security_authenticated_generate_equals_hf(worker, tiny_model):
    w, s = worker
    prompt = make_prompts([11], seed=5)[0]
    md = call_metadata(SECRET, f"{SERVICE}/Generate")
    got = tokens(s.Generate(spec("ok", prompt), timeout=30, metadata=md))
    assert got == hf_greedy(tiny_model("llama"), [prompt], 12)[0]
    wait_all_free([_Authed(s)])


def test_security_router_client_carries_the_secret(worker):
    w, _ = worker

    async def run() -> None:
        good, bare = WorkerClient(w.address, SECRET), WorkerClient(w.address)
        try:
            assert (await fetch_info(good, 5)).worker_id == "auth-d"
            chunks = [c async for c in good.decode.Generate(spec("aio", [5, 6, 7]), timeout=30)]
            assert chunks[-1].finished
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bare.decode.Info(pb.InfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await good.close()
            await bare.close()

    asyncio.run(run())
    wait_all_free([_Authed(worker[1])])


class _Authed:
    """A stub whose Stats carries a token (for ``wait_all_free``)."""

    def __init__(self, s) -> None:
        self.s = s

    def Stats(self, req):  # noqa: N802 - the gRPC method's name
        return self.s.Stats(req, timeout=5, metadata=_md("Stats"))
