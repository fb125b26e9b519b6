"""A prefill whose first token fails (non-finite logits, on a checkpoint broken on purpose)
releases the decode worker's reservation by itself: the prefill worker holds its last
layer back until the first token is sampled, so the failure aborts a transfer the decode
worker has not completed and D frees the blocks at once, with no Abort from a router
(which may be gone) and well before the lease. Real gRPC, in-process workers, tcp."""

from __future__ import annotations

import time

import grpc
import pytest

from kv_transfer import TransferState
from proto import worker_pb2 as pb
from tests.decode_worker.inproc import spec, start, stub, tokens, wait_all_free
from tests.engine.broken_model import POISON, clean_prompts, nan_token_model
from tests.engine.hf_reference import hf_greedy

LEASE_S = 30.0
FREED_WITHIN_S = 5.0
"""Far below the lease: what "promptly" means on a busy 2-core machine."""


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    return nan_token_model(tiny_model("llama"), tmp_path_factory.mktemp("broken") / "m")


@pytest.fixture
def pair(broken):
    d, p = start("decode", broken, worker_id="ft-d"), start("prefill", broken, worker_id="ft-p")
    yield d, p
    p.stop()
    d.stop()


def _sample_after_d_has_what_p_sent(d, p, rid: str, monkeypatch) -> None:
    """Let P's step return (and so its first token reach the output handler) only once D
    holds every layer P has queued, so the old code's race (D may or may not have all
    layers when P fails) always goes the way that leaked."""
    engine, real = p.worker.engine, p.worker.engine.step
    num_layers = engine.layout.num_layers

    def step():
        outs = real()
        job = p.worker._jobs.get(rid)
        req = d.worker._reqs.get(rid)
        if job is not None and req is not None and req.receiver is not None:
            deadline = time.monotonic() + 10
            queued = lambda: len(job.sender._queued)  # noqa: E731  (test-only peek)
            while req.receiver.poll() is not TransferState.SUCCESS and queued() == num_layers:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        return outs

    monkeypatch.setattr(engine, "step", step)


def test_security_failed_first_token_frees_the_decode_reservation_without_an_abort(
    pair, broken, monkeypatch
):
    d, p = pair
    (ds, dch), (ps, pch) = stub(d), stub(p)
    poison = [5, POISON, 6, 7] + clean_prompts(broken, [21], seed=351)[0]
    _sample_after_d_has_what_p_sent(d, p, "bad", monkeypatch)
    try:
        res = ds.Reserve(pb.ReserveRequest(request=spec("bad", poison), kv_transport="tcp", lease_s=LEASE_S), timeout=30)  # fmt: skip
        held = ds.Stats(pb.StatsRequest(), timeout=5)
        assert held.num_free_blocks < held.num_blocks
        with pytest.raises(grpc.RpcError) as err:
            ps.Prefill(pb.PrefillRequest(request=spec("bad", poison), ticket=res.ticket), timeout=30)  # fmt: skip
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "non-finite logits" in err.value.details()
        t0 = time.monotonic()
        wait_all_free([ds, ps], timeout=FREED_WITHIN_S)  # no Abort sent to either worker
        assert time.monotonic() - t0 < LEASE_S
        with pytest.raises(grpc.RpcError) as err:  # the reservation is gone, not decodable
            list(ds.Decode(pb.DecodeRequest(request_id="bad", first_token=pb.Token(token_id=1)), timeout=10))  # fmt: skip
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        good = clean_prompts(broken, [17], seed=352)[0]
        _disagg_ok(ds, ps, good, broken)
    finally:
        dch.close()
        pch.close()


def _disagg_ok(ds, ps, prompt, model) -> None:
    """A good disaggregated request afterwards is HF-exact (the held last layer arrives)."""
    res = ds.Reserve(pb.ReserveRequest(request=spec("good", prompt), kv_transport="tcp"), timeout=30)  # fmt: skip
    pre = ps.Prefill(pb.PrefillRequest(request=spec("good", prompt), ticket=res.ticket), timeout=30)  # fmt: skip
    rest = tokens(ds.Decode(pb.DecodeRequest(request_id="good", first_token=pre.first_token), timeout=30))  # fmt: skip
    assert [pre.first_token.token_id] + rest == hf_greedy(model, [prompt], 12)[0]
    wait_all_free([ds, ps])
