"""Signed tickets through real gRPC workers: a Prefill RPC carrying a ticket the decode
worker did not issue is refused (PERMISSION_DENIED) before the prefill worker connects
anywhere; a genuine one streams the KV and decodes HF-exact."""

from __future__ import annotations

import socket

import grpc
import pytest

from engine.config import TransferConfig
from engine.security import ClusterSecret
from proto import worker_pb2 as pb
from tests.decode_worker.inproc import serving, spec, start, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts

from .test_prefill_worker import disagg

SECRET = ClusterSecret(b"worker-test-secret-0123456789ab")


@pytest.fixture(scope="module")
def workers(tiny_model):
    model = tiny_model("llama")
    # The secret on the KV plane only (TransferConfig.secret; with --cluster-secret-file
    # the gRPC plane would want it too, which test_grpc_auth covers).
    kv_only = TransferConfig(secret=SECRET)
    running = [
        start("decode", model, worker_id="d-sec", transfer=kv_only),
        start("prefill", model, worker_id="p-sec", transfer=kv_only),
    ]
    with serving(running) as stubs:
        yield stubs


@pytest.fixture(autouse=True)
def no_leak(workers):
    yield
    wait_all_free(workers)


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (lambda t, trap: setattr(t, "endpoint", trap), "signature does not match"),
        (lambda t, trap: t.block_ids.append(63), "signature does not match"),
        (lambda t, trap: t.ClearField("signature"), "is unsigned"),
    ],
    ids=["endpoint", "block_ids", "unsigned"],
)
def test_security_forged_ticket_is_refused_before_connecting(workers, forge, message):
    decode, prefill = workers
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    prompt = make_prompts([20], seed=41)[0]
    try:
        res = decode.Reserve(
            pb.ReserveRequest(request=spec("forged", prompt), kv_transport="tcp", lease_s=30)
        )
        assert res.ticket.signature and res.ticket.backend == "tcp"
        forged = pb.TransferTicket()
        forged.CopyFrom(res.ticket)
        forge(forged, f"127.0.0.1:{trap.getsockname()[1]}")
        request = pb.PrefillRequest(
            request=spec("forged", prompt), ticket=forged, num_cached_blocks=res.num_cached_blocks
        )
        with pytest.raises(grpc.RpcError) as err:
            prefill.Prefill(request)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        assert message in err.value.details()
        with pytest.raises(BlockingIOError):  # nothing ever connected to the forged address
            trap.accept()
    finally:
        trap.close()
    assert decode.Abort(pb.AbortRequest(request_id="forged")).found  # the router's job


def test_security_signed_ticket_streams_kv_and_decodes_hf_exact(workers, tiny_model):
    decode, prefill = workers
    prompt = make_prompts([37], seed=42)[0]
    out, res, _ = disagg(decode, prefill, "signed", prompt)
    assert res.ticket.signature
    assert out == hf_greedy(tiny_model("llama"), [prompt], 12)[0]
