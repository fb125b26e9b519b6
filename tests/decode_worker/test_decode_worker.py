"""The decode worker over real gRPC: local generation, reservations, leases, aborts."""

from __future__ import annotations

import grpc
import pytest

from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.waiting import Threads

from .inproc import GREEDY, NUM_BLOCKS, spec, start, stub, tokens, wait_all_free


@pytest.fixture(scope="module")
def decode(tiny_model):
    worker = start("decode", tiny_model("llama"), lease_s=1.0)
    s, channel = stub(worker)
    yield s
    channel.close()
    worker.stop()


@pytest.fixture(autouse=True)
def no_leak(decode):
    yield
    wait_all_free([decode])


def test_generate_equals_hf_with_continuous_batching(decode, tiny_model):
    prompts = make_prompts([9, 33, 20], seed=21)
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = tokens(decode.Generate(spec(f"g{i}", prompts[i])))

    threads = Threads()
    for i in range(len(prompts)):
        threads.start(run, i)
    threads.join(60)
    assert [results[i] for i in range(3)] == hf_greedy(tiny_model("llama"), prompts, 12)


def test_generate_reports_usage_and_finish(decode):
    chunks = list(decode.Generate(spec("u", [5, 6, 7], SamplingParams(max_tokens=3))))
    assert [len(c.tokens) for c in chunks] == [1, 1, 1]
    last = chunks[-1]
    assert last.finished and last.finish_reason == "length"
    assert (last.num_prompt_tokens, last.num_output_tokens) == (3, 3)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], GREEDY, "prompt is empty"),
        ([5, 100000], GREEDY, "outside the vocabulary"),
        ([5, 6], SamplingParams(max_tokens=2, top_p=1.0), None),
    ],
)
def test_generate_rejects_bad_input(decode, prompt, params, match):
    if match is None:  # a valid request passes through the same path
        assert len(tokens(decode.Generate(spec("ok", prompt, params)))) == 2
        return
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Generate(spec("bad", prompt, params)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in err.value.details()


def test_invalid_sampling_params_are_invalid_argument(decode):
    msg = spec("bad-params", [5, 6])
    msg.params.top_p = 0.0
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Generate(msg))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in err.value.details()


def test_reserve_then_abort_frees_blocks(decode):
    prompt = make_prompts([40], seed=22)[0]
    res = decode.Reserve(pb.ReserveRequest(request=spec("r", prompt), kv_transport="tcp"))
    assert len(res.ticket.block_ids) == 3 and res.ticket.backend == "tcp"
    stats = decode.Stats(pb.StatsRequest())
    assert stats.num_free_blocks == NUM_BLOCKS - 3 and stats.queues["reserved"] == 1
    assert decode.Abort(pb.AbortRequest(request_id="r")).found
    assert not decode.Abort(pb.AbortRequest(request_id="r")).found


def test_lease_expiry_frees_blocks_and_decode_is_refused(decode):
    prompt = make_prompts([20], seed=23)[0]
    req = pb.ReserveRequest(request=spec("lease", prompt), kv_transport="tcp", lease_s=0.2)
    decode.Reserve(req)
    wait_all_free([decode], timeout=3.0)
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="lease", first_token=pb.Token(token_id=5))))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reserve_errors(decode):
    prompt = make_prompts([20], seed=24)[0]
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(pb.ReserveRequest(request=spec("x", prompt), kv_transport="ucx"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "tcp" in err.value.details()
    big = make_prompts([600], seed=25)[0]  # 38 blocks each: the pool holds one, not two
    try:
        decode.Reserve(pb.ReserveRequest(request=spec("big1", big), kv_transport="tcp"))
        with pytest.raises(grpc.RpcError) as err:
            decode.Reserve(pb.ReserveRequest(request=spec("big2", big[::-1]), kv_transport="tcp"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for rid in ("big1", "big2"):
            decode.Abort(pb.AbortRequest(request_id=rid))


@pytest.mark.parametrize("tp", [3, 8, 2**30])
def test_tensor_parallel_reserve_refuses_a_prefill_tp_size_the_model_cannot_split(decode, tp):
    """A prefill_tp_size that no prefill group of this model can have (4 attention heads)
    is the caller's error, named, before any part is planned: it was UNAVAILABLE (3), a
    reservation for 8 ranks that cannot exist, or an engine thread planning 2**30 ranks."""
    req = pb.ReserveRequest(request=spec("tp", [5, 6, 7]), kv_transport="tcp", prefill_tp_size=tp)  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert f"prefill_tp_size={tp}" in err.value.details()
    assert "num_attention_heads=4" in err.value.details()


def test_cancelled_stream_aborts_the_request(decode):
    call = decode.Generate(spec("c", [5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True)))
    first = next(call)
    assert first.tokens and not first.finished
    call.cancel()
    wait_all_free([decode], timeout=5.0)


def test_info_and_health(decode):
    info = decode.Info(pb.InfoRequest())
    assert (info.role, info.worker_id, list(info.kv_transports)) == ("decode", "decode-t", ["tcp"])
    assert info.num_blocks == NUM_BLOCKS and info.layout.block_size == 16 and info.epoch > 0
    assert decode.Health(pb.HealthRequest(), timeout=10).serving
    stats = decode.Stats(pb.StatsRequest(), timeout=10)  # answers (a hung Stats fails here)
    assert (stats.num_blocks, stats.num_free_blocks, stats.num_requests) == (
        NUM_BLOCKS,
        NUM_BLOCKS,
        0,
    )
