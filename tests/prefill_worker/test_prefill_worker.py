"""Prefill worker → decode worker over real gRPC and kv_transfer (no Ray, no router)."""

from __future__ import annotations

import grpc
import pytest

from proto import worker_pb2 as pb
from tests.decode_worker.inproc import NUM_BLOCKS, serving, spec, start, stub, tokens, wait_all_free
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
    with serving(workers) as stubs:
        yield stubs


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
    """The lease ends before the slow prefill worker connects: its transfer is refused.
    The first token may already be out by then (Prefill replies when it samples), so the
    request fails on Prefill (ABORTED) or on Decode (the reservation is gone)."""
    decode, _, slow = pair
    prompt = make_prompts([25], seed=35)[0]
    with pytest.raises(grpc.RpcError) as err:
        disagg(decode, slow, "late", prompt, lease_s=0.1)  # the slow worker waits 0.5 s
    assert err.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND)


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
    # Prefill fails (ABORTED) if its transfer's refusal came before its first token,
    # else Decode does: the reservation is gone
    assert errors and errors[0].code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND)


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


def reserve(decode, rid, prompt, transport="tcp", lease_s=10.0):
    req = pb.ReserveRequest(request=spec(rid, prompt), kv_transport=transport, lease_s=lease_s)
    return decode.Reserve(req)


def attach(prefill, rid, res):
    req = pb.AttachTicketRequest(
        request_id=rid, ticket=res.ticket, num_cached_blocks=res.num_cached_blocks
    )
    return prefill.AttachTicket(req)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_first_token_comes_before_the_ticket_and_the_kv_follows_it(pair, tiny_model, transport):
    """Prefill without a ticket (the router reserves meanwhile) answers its first token as
    soon as it is sampled; the ticket then sends every layer, and decode equals HF."""
    decode, prefill, _ = pair
    prompt = make_prompts([45], seed=41 if transport == "tcp" else 42)[0]
    rid = f"follow-{transport}"
    pre = prefill.Prefill(pb.PrefillRequest(request=spec(rid, prompt), ticket_follows=True))
    assert pre.compute_seconds > 0 and pre.queue_seconds >= 0
    res = reserve(decode, rid, prompt, transport)
    attach(prefill, rid, res)
    chunks = list(decode.Decode(pb.DecodeRequest(request_id=rid, first_token=pre.first_token)))
    got = [pre.first_token.token_id] + tokens(chunks)
    assert got == hf_greedy(tiny_model("llama"), [prompt], 12)[0]
    report = chunks[0].transfer
    assert report.bytes > 0 and report.seconds >= 0 and report.tail_seconds >= 0
    assert report.admission_seconds >= 0
    assert not any(c.HasField("transfer") for c in chunks[1:])


def test_a_ticket_may_come_before_its_prefill(pair, tiny_model):
    decode, prefill, _ = pair
    prompt = make_prompts([20], seed=43)[0]
    res = reserve(decode, "early", prompt)
    attach(prefill, "early", res)  # held until its Prefill comes
    pre = prefill.Prefill(pb.PrefillRequest(request=spec("early", prompt), ticket_follows=True))
    out = [pre.first_token.token_id] + tokens(
        decode.Decode(pb.DecodeRequest(request_id="early", first_token=pre.first_token))
    )
    assert out == hf_greedy(tiny_model("llama"), [prompt], 12)[0]


def test_a_ticket_that_does_not_fit_the_prompt_fails_both_calls(pair):
    decode, prefill, _ = pair
    prompt = make_prompts([40], seed=44)[0]
    res = reserve(decode, "misfit", make_prompts([10], seed=45)[0])  # 1 block, not 3
    pre = prefill.Prefill(pb.PrefillRequest(request=spec("misfit", prompt), ticket_follows=True))
    with pytest.raises(grpc.RpcError) as err:
        attach(prefill, "misfit", res)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ticket has 1 blocks but a 40-token prompt" in err.value.details()
    assert pre.first_token.token_id >= 0  # the token was out already
    # the refused ticket's transfer was aborted, so D freed the reservation itself
    wait_until(lambda: not holds(decode), timeout=10, what="D dropped the reservation")


def test_without_a_ticket_within_the_lease_the_prefill_is_dropped(tiny_model):
    prefill = start("prefill", tiny_model("llama"), worker_id="lease", lease_s=0.5)
    s, channel = stub(prefill)
    try:
        prompt = make_prompts([30], seed=46)[0]
        s.Prefill(pb.PrefillRequest(request=spec("orphan", prompt), ticket_follows=True))
        assert holds(s)  # its blocks wait for a ticket ...
        wait_all_free([s], timeout=10)  # ... for one lease, then go back
        decode_res = pb.ReserveResponse(ticket=pb.TransferTicket(transfer_id="x", endpoint="127.0.0.1:1", backend="tcp", block_ids=[1, 2]))  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:  # a ticket after that is refused
            attach(s, "orphan", decode_res)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    finally:
        channel.close()
        prefill.stop()
