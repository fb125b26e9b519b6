"""Property-based fuzz of the workers' gRPC surface, over real gRPC against in-process
workers that authenticate (a caller holding the cluster secret, as a router does):
any RequestSpec, ReserveRequest, PrefillRequest (a real signed ticket, altered or not,
any cached-block count) and DecodeRequest a peer can encode is served or refused with a
client-error status, never UNKNOWN/INTERNAL (an uncaught exception), UNAVAILABLE (a dead
loop) or a hang (every call has a deadline); afterwards every KV block is free, both
loops serve, and greedy output is HF-exact."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from engine.config import CacheConfig, EngineConfig, WorkerConfig
from engine.grpc_auth import call_metadata
from engine.security import ClusterSecret
from proto import worker_pb2 as pb
from router.launch.worker_main import start_worker
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.fuzzing import budget

from .inproc import secret_file, spec, stub, tokens, wait_all_free
from .test_fuzz_proto import DOUBLES, U32S, near_valid_pb_params

SECRET = ClusterSecret(b"fuzz-grpc-cluster-secret-0123456789")
MAX_MODEL_LEN = 40
"""Small context: a fuzzed max_tokens ends at the context, so each call is short."""
T = 30.0
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
}  # fmt: skip


def _start(role: str, model):
    engine = EngineConfig(
        str(model), max_model_len=MAX_MODEL_LEN, cache=CacheConfig(block_size=16, num_blocks=32)
    )
    secret = secret_file(SECRET)
    cfg = WorkerConfig(role, engine, kv_transports=("tcp",), cluster_secret_file=secret, worker_id=f"fz-{role}")  # fmt: skip
    return start_worker(cfg)


class Authed:
    """A sync stub whose every call carries a fresh token and a deadline."""

    def __init__(self, worker) -> None:
        self.stub, self.channel = stub(worker)
        self.service = "DecodeService" if worker.config.role == "decode" else "PrefillService"

    def __getattr__(self, method: str):
        fn = getattr(self.stub, method)
        path = f"/pdserve.worker.{self.service}/{method}"
        return lambda req: fn(req, timeout=T, metadata=call_metadata(SECRET, path))


@pytest.fixture(scope="module")
def workers(tiny_model):
    d, p = _start("decode", tiny_model("llama")), _start("prefill", tiny_model("llama"))
    stubs = Authed(d), Authed(p)
    yield stubs
    for s in stubs:
        s.channel.close()
    d.stop()
    p.stop()


def outcome(what: str, call) -> grpc.StatusCode:
    """Run ``call`` (a stream is read to its end); its status, checked to be allowed
    (``--hypothesis-show-statistics`` lists how often each came up)."""
    code = grpc.StatusCode.OK
    try:
        result = call()
        if not hasattr(result, "ByteSize"):
            list(result)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (what, exc.code(), exc.details())
        assert len(exc.details() or "") < 4096, "an error echoes a whole input back"
        code = exc.code()
    event(f"{what}: {code.name}")
    return code


PROMPTS = st.one_of(
    st.lists(st.integers(0, 511), min_size=1, max_size=MAX_MODEL_LEN - 1),
    st.lists(st.integers(0, 511), min_size=MAX_MODEL_LEN - 2, max_size=MAX_MODEL_LEN + 1),
    st.lists(st.one_of(st.integers(0, 511), st.sampled_from([512, 2**31, 2**32 - 1])), max_size=8),
)
"""Prompts mostly within the vocabulary and the context, some at or past either bound."""
SPECS = st.builds(
    pb.RequestSpec,
    request_id=st.text(max_size=12),
    prompt_token_ids=PROMPTS,
    params=near_valid_pb_params(),
)


@pytest.fixture(autouse=True)
def still_serving(workers, tiny_model):
    """After the fuzzing: nothing held, both loops serve, greedy output is HF-exact."""
    yield
    d, p = workers
    wait_all_free([d, p], timeout=10)
    for s in workers:
        assert s.Health(pb.HealthRequest()).serving
    prompt = make_prompts([13], seed=4401)[0]
    assert tokens(d.Generate(spec("fz-after", prompt))) == hf_greedy(tiny_model("llama"), [prompt], 12)[0]  # fmt: skip


@budget(100)
@given(SPECS)
def test_fuzz_generate_any_request_spec(workers, msg):
    d, _ = workers
    try:
        outcome("Generate", lambda: d.Generate(msg))
    finally:
        d.Abort(pb.AbortRequest(request_id=msg.request_id))


@st.composite
def alter(draw, ticket: pb.TransferTicket) -> pb.TransferTicket:
    """``ticket`` unchanged, or with one field changed (a forged or stale ticket)."""
    out = pb.TransferTicket()
    out.CopyFrom(ticket)
    field = draw(st.sampled_from(["none", "none", "endpoint", "block_ids", "epoch", "lease_deadline", "signature", "backend"]))  # fmt: skip
    if field == "endpoint":
        out.endpoint = draw(st.text(max_size=30))
    elif field == "block_ids":
        out.block_ids[:] = draw(st.lists(U32S, max_size=5))
    elif field == "epoch":
        out.epoch = draw(st.integers(0, 2**64 - 1))
    elif field == "lease_deadline":
        out.lease_deadline = draw(DOUBLES)
    elif field == "signature":
        out.signature = draw(st.binary(max_size=40))
    elif field == "backend":
        out.backend = draw(st.sampled_from(["shm", "ucx", "nope", ""]))
    return out


@budget(100)
@given(st.data())
def test_fuzz_disaggregated_calls(workers, data):
    d, p = workers
    msg = data.draw(SPECS)
    rid = msg.request_id
    lease = data.draw(st.one_of(st.just(0.0), st.floats(0.5, 60), DOUBLES))
    transport = data.draw(st.sampled_from(["tcp"] * 6 + ["shm", ""]))
    res = {}
    reserve = pb.ReserveRequest(request=msg, kv_transport=transport, lease_s=lease)
    try:
        if (
            outcome("Reserve", lambda: res.setdefault("r", d.Reserve(reserve)))
            != grpc.StatusCode.OK
        ):
            return
        assert math.isfinite(lease) and 0 <= lease <= 3600, f"lease_s={lease} accepted"
        ticket = data.draw(alter(res["r"].ticket))
        cached = data.draw(st.one_of(st.just(res["r"].num_cached_blocks), U32S))
        pre = pb.PrefillRequest(request=msg, ticket=ticket, num_cached_blocks=cached)
        if outcome("Prefill", lambda: res.setdefault("p", p.Prefill(pre))) != grpc.StatusCode.OK:
            return
        first = data.draw(st.one_of(st.just(res["p"].first_token), st.builds(pb.Token, token_id=U32S)))  # fmt: skip
        outcome("Decode", lambda: d.Decode(pb.DecodeRequest(request_id=rid, first_token=first)))
    finally:
        d.Abort(pb.AbortRequest(request_id=rid))
        p.Abort(pb.AbortRequest(request_id=rid))


@pytest.mark.parametrize("lease", [float("inf"), float("nan"), -1.0, 1e300])
def test_fuzz_reserve_refuses_a_lease_that_never_or_already_ended(workers, lease):
    """Regression (found by the fuzzer): an infinite lease held the blocks forever when
    no KV came; NaN and negative leases expired at once."""
    d, _ = workers
    req = pb.ReserveRequest(request=spec("lease", [5, 6, 7]), kv_transport="tcp", lease_s=lease)
    with pytest.raises(grpc.RpcError) as err:
        d.Reserve(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lease_s" in err.value.details()
