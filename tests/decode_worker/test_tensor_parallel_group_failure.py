"""A worker whose engine cannot go on (a batch forward failed: in a TP or EP group, a rank
died) fails every request with UNAVAILABLE and frees every KV block before its process
ends: running requests, reservations whose KV was still on the way, and on the prefill
side prefills still computing."""

from __future__ import annotations

import grpc
import pytest

from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb
from tests.e2e.inproc_cluster import Exits
from tests.engine.hf_reference import make_prompts
from tests.waiting import wait_until

from .inproc import NUM_BLOCKS, spec, start, stub

LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


def _break_forward(worker, monkeypatch) -> None:
    """The next step raises from the batch forward, as a failed collective does."""

    def boom(*a, **kw):
        raise RuntimeError("injected: Connection closed by peer")

    monkeypatch.setattr(worker.worker.engine.runner, "forward", boom)


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_failed_engine_fails_every_request_and_frees_every_block(role, tiny_model, monkeypatch):
    exits = Exits(monkeypatch)
    model = tiny_model("llama")
    decode = start("decode", model, worker_id=f"gf-d-{role}")
    dstub, dchan = stub(decode)
    prefill = start("prefill", model, worker_id="gf-p", chunk=4) if role == "prefill" else None
    try:
        engine = decode.worker.engine if role == "decode" else prefill.worker.engine
        prompts = make_prompts([30, 20], seed=301)
        res = dstub.Reserve(pb.ReserveRequest(request=spec("gf-r", prompts[1]), kv_transport="tcp"))
        if role == "decode":
            stream = dstub.Generate(spec("gf-g", prompts[0], LONG), timeout=60)
            next(stream)  # decoding
            assert engine.num_free_blocks < NUM_BLOCKS
            _break_forward(decode, monkeypatch)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
        else:
            pstub, pchan = stub(prefill)
            _break_forward(prefill, monkeypatch)
            req = pb.PrefillRequest(request=spec("gf-r", prompts[1]), ticket=res.ticket)
            with pytest.raises(grpc.RpcError) as err:
                pstub.Prefill(req, timeout=60)
            pchan.close()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the engine loop of" in err.value.details()
        wait_until(lambda: exits.codes == [1], 10, "the process exit")
        assert engine.num_free_blocks == engine.layout.num_blocks  # nothing held any more
    finally:
        dchan.close()
        for w in (decode, prefill):
            if w is not None:
                w.stop()
