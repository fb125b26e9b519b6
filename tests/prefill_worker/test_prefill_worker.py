"""Prefill worker → decode worker over real gRPC and kv_transfer (no Ray, no router)."""

from __future__ import annotations

import grpc
import pytest

from proto import worker_pb2 as pb
from tests.decode_worker.inproc import NUM_BLOCKS, spec, start, stub, tokens, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.faults import DelayRpc
from tests.waiting import Threads, wait_until


@pytest.fixture(scope="module")
def pair(tiny_model):
    model = tiny_model("llama")
    workers = [
        start("decode", model, transports=("tcp", "shm")),
        # A 16-token step budget: a 45-token prompt takes three prefill chunks.
        start("prefill", model, transports=("tcp", "shm"), chunk=16),
        start("prefill", model, worker_id="slow", interceptors=[DelayRpc("Prefill", 0.5)]),
    ]
    stubs = [stub(w) for w in workers]
    yield [s for s, _ in stubs]
    for (_, channel), w in zip(stubs, workers, strict=True):
        channel.close()
        w.stop()


@pytest.fixture(autouse=True)
def no_leak(pair):
    yield
    wait_all_free(pair)


def holds(stub) -> bool:
    return stub.Stats(pb.StatsRequest(), timeout=5).num_requests == 1


def disagg(decode, prefill, rid, prompt, transport="tcp", lease_s=10.0):
    res = decode.Reserve(
        pb.ReserveRequest(request=spec(rid, prompt), kv_transport=transport, lease_s=lease_s)
    )
    pre = prefill.Prefill(
        pb.PrefillRequest(
            request=spec(rid, prompt), ticket=res.ticket, num_cached_blocks=res.num_cached_blocks
        )
    )
    out = [pre.first_token.token_id] + tokens(
        decode.Decode(pb.DecodeRequest(request_id=rid, first_token=pre.first_token))
    )
    return out, res, pre


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_chunked_prefill_streams_kv_and_decode_equals_hf(pair, tiny_model, transport):
    decode, prefill, _ = pair
    prompts = make_prompts([45, 7], seed=31 if transport == "tcp" else 32)
    in_place = lambda: decode.Stats(pb.StatsRequest()).transfer["shm.in_place_pages"]  # noqa: E731
    before = in_place()
    got = [
        disagg(decode, prefill, f"{transport}{i}", p, transport)[0] for i, p in enumerate(prompts)
    ]
    assert got == hf_greedy(tiny_model("llama"), prompts, 12)
    # shm: the decode worker's KV cache is in shared memory and the prefill worker wrote
    # every page straight into it (one copy per byte); tcp never writes in place
    assert (in_place() > before) == (transport == "shm")


def test_concurrent_prefills_are_batched(pair, tiny_model):
    decode, prefill, _ = pair
    prompts = make_prompts([30, 18, 52], seed=33)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = disagg(decode, prefill, f"c{i}", prompts[i])[0]

    threads = Threads()
    for i in range(3):
        threads.start(run, i)
    threads.join(60)
    assert [got[i] for i in range(3)] == hf_greedy(tiny_model("llama"), prompts, 12)


def test_decode_side_prefix_hit_sends_fewer_pages(pair, tiny_model):
    decode, prefill, _ = pair
    shared = make_prompts([40], seed=34)[0]
    prompts = [shared + [7, 8, 9], shared + [10, 11]]
    first, res1, pre1 = disagg(decode, prefill, "p1", prompts[0])
    second, res2, pre2 = disagg(decode, prefill, "p2", prompts[1])
    assert (res1.num_cached_blocks, res2.num_cached_blocks) == (0, 2)
    assert len(res2.ticket.block_ids) == 1
    assert pre2.transfer_bytes * 3 == pre1.transfer_bytes
    assert pre2.num_cached_tokens == 32  # the prefill side hit its own cache too
    assert [first, second] == hf_greedy(tiny_model("llama"), prompts, 12)


def test_expired_lease_fails_the_prefill_and_frees_both(pair):
    decode, _, slow = pair
    prompt = make_prompts([25], seed=35)[0]
    with pytest.raises(grpc.RpcError) as err:
        disagg(decode, slow, "late", prompt, lease_s=0.1)  # the slow worker waits 0.5 s
    assert err.value.code() == grpc.StatusCode.ABORTED


def test_abort_on_both_workers_mid_request(pair):
    decode, _, slow = pair
    prompt = make_prompts([25], seed=36)[0]
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            disagg(decode, slow, "ab", prompt)
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = Threads()
    threads.start(run)
    # Mid-request: reserved on the decode worker; the slow prefill worker waits 0.5 s
    # before it prefills (the request is in its service, not yet in its Stats).
    wait_until(lambda: holds(decode), timeout=30, what="the decode worker holds 'ab'")
    assert decode.Abort(pb.AbortRequest(request_id="ab")).found
    slow.Abort(pb.AbortRequest(request_id="ab"))
    threads.join(30)
    assert errors and errors[0].code() == grpc.StatusCode.ABORTED


def test_layout_mismatch_is_refused_with_both_values(pair, tiny_model):
    decode = pair[0]
    odd = start("prefill", tiny_model("llama"), block_size=32, worker_id="odd")
    odd_stub, channel = stub(odd)
    try:
        with pytest.raises(grpc.RpcError) as err:
            disagg(decode, odd_stub, "mm", make_prompts([40], seed=37)[0])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "block_size mismatch" in err.value.details()
        assert "decode=16, prefill=32" in err.value.details()
        assert decode.Abort(pb.AbortRequest(request_id="mm")).found  # the router's job
        wait_all_free([odd_stub])
    finally:
        channel.close()
        odd.stop()


def test_stats_and_info(pair, tiny_model):
    decode, prefill, _ = pair
    info = prefill.Info(pb.InfoRequest())
    assert info.role == "prefill" and info.num_blocks == NUM_BLOCKS
    prompt = make_prompts([45], seed=38)[0]  # three 16-token chunks: a measured rate
    assert disagg(decode, prefill, "rate", prompt)[0] == hf_greedy(tiny_model("llama"), [prompt], 12)[0]  # fmt: skip
    stats = prefill.Stats(pb.StatsRequest())
    assert set(stats.queues) == {"waiting", "running", "sending"}
    assert stats.prefill_tokens_per_s > 0  # for the router's TTFT prediction
