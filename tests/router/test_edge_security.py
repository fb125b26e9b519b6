"""The router's edge against a hostile client, over real HTTP to real gRPC workers (in this
process): every mistake is a 4xx naming the field, the value and the limit; a 500 carries
no exception text; the in-flight count and every KV block come back; /health answers
while a huge prompt is processed; clients that leave or stop reading are aborted."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

import router.run
from engine.config.router import RouterConfig
from engine.tokenizer import Tokenizer
from router.server import Router
from tests.decode_worker.inproc import serving, wait_all_free
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.faults import DelayRpc

from .edge_helpers import (
    assert_error,
    blocks,
    post,
    raw_post,
    raw_request,
    start,
    wait_until,
)

LOCAL = 100_000  # local_prefill_tokens: every prompt is prefilled on the decode worker
PREFILL_DELAY_S = 60.0  # each prefill waits this long first (a test hook)


@pytest.fixture(scope="module")
def workers(tiny_model):
    model = tiny_model("llama")
    decode = start("decode", model, worker_id="edge-d")
    slow = [DelayRpc("Prefill", PREFILL_DELAY_S)]
    prefill = start("prefill", model, worker_id="edge-p", interceptors=slow)
    with serving([decode, prefill]) as stubs:
        yield {"model": model, "decode": decode, "prefill": prefill, "stubs": stubs}


@pytest.fixture
def routers(workers):
    """``routers(**config)``: a router on both workers; afterwards every router is stopped,
    has nothing in flight, and every KV block is free."""
    made = []

    def make(**overrides):
        cfg = RouterConfig(str(workers["model"]), "m", **{"local_prefill_tokens": LOCAL, **overrides})  # fmt: skip
        router = Router(cfg, [workers["decode"].address, workers["prefill"].address])
        made.append(router.start_in_thread())
        return made[-1]

    yield make
    for rt in made:
        assert wait_until(lambda rt=rt: rt.router.service.inflight == 0, 10), "in-flight leaked"
        rt.stop()
    wait_all_free(workers["stubs"], timeout=10)


def greedy_ok(rt, model) -> None:
    prompt = make_prompts([9], seed=71)[0]
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    r = post(rt, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == hf_greedy(model, [prompt], 4)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_security_uint32_overflow_is_400_and_inflight_returns_to_zero(routers, workers, stream):
    rt = routers(max_inflight=1)
    cases = [
        ({"top_k": 2**32}, "top_k", "4294967296"),
        ({"stop_token_ids": [2**32]}, "stop_token_ids", "4294967296"),
        ({"prompt": [5, 2**32]}, "prompt", "4294967296"),
        ({"seed": 2**64}, "seed", "18446744073709551616"),
    ]
    for fields, param, value in cases:
        body = {"model": "m", "prompt": "hi", "stream": stream, **fields}
        err = assert_error(post(rt, "/v1/completions", body), 400, value)
        assert err["param"] == param, err
        assert rt.router.service.inflight == 0
    greedy_ok(rt, workers["model"])  # max_inflight=1: nothing leaked a slot


def test_security_model_bounds_are_400s_naming_field_value_and_limit(routers, workers):
    """Each of these reached the engine before; the first two killed its thread."""
    rt = routers()
    vocab = Tokenizer.from_dir(workers["model"]).vocab_size
    cases = [
        (
            {"stop_token_ids": [100000], "min_tokens": 1},
            "stop_token_ids",
            ["100000", f"[0, {vocab})"],
        ),  # fmt: skip
        ({"temperature": 1e-45}, "temperature", ["1e-45", "0.01"]),
        ({"top_k": vocab + 1}, "top_k", [str(vocab + 1), f"top_k <= {vocab}"]),
        ({"prompt": [1, vocab]}, "prompt", [str(vocab), "outside the vocabulary"]),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens", ["min_tokens=9", "max_tokens=3"]),
    ]
    for fields, param, needles in cases:
        body = {"model": "m", "prompt": "hi", **fields}
        err = assert_error(post(rt, "/v1/completions", body), 400, *needles)
        assert err["param"] == param, err
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": vocab + 1}
    assert assert_error(post(rt, "/v1/chat/completions", chat), 400, "top_k")["param"] == "top_k"
    greedy_ok(rt, workers["model"])


def test_security_stop_string_limits(routers):
    rt = routers()
    body = {"model": "m", "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
    err = assert_error(post(rt, "/v1/completions", {**body, "stop": ["a"] * 65}), 400, "at most 64")
    assert err["param"] == "stop"
    long = {**body, "stop": ["ok", "z" * 513]}
    assert assert_error(post(rt, "/v1/completions", long), 400, "stop[1] is 513", "512")["param"] == "stop"  # fmt: skip
    # The documented limits themselves are accepted, streamed and non-streamed.
    many = {**body, "stop": [f"{i:03d}" + "\x00" * 508 for i in range(64)]}
    assert post(rt, "/v1/completions", many).json()["usage"]["completion_tokens"] == 8
    events = sse_events(post(rt, "/v1/completions", {**many, "stream": True}))
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]


def sse_events(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]


def test_security_prompt_characters_are_refused_before_tokenizing(routers, monkeypatch):
    rt = routers()
    calls = []
    tok = rt.router.service.tokenizer
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **kw: calls.append(1) or real_encode(*a, **kw))
    limit = 32 * 2048  # the default: 32 characters per token of the context length
    err = assert_error(post(rt, "/v1/completions", {"model": "m", "prompt": "a" * (limit + 1)}), 400, str(limit + 1), str(limit), "--max-prompt-chars")  # fmt: skip
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    half = "b" * (limit // 2 + 1)
    chat = {"model": "m", "messages": [{"role": "user", "content": half}] * 2}
    assert assert_error(post(rt, "/v1/chat/completions", chat), 400, str(limit))["param"] == "messages"  # fmt: skip
    assert calls == []
    capped = routers(max_prompt_chars=10)
    assert_error(post(capped, "/v1/completions", {"model": "m", "prompt": "x" * 11}), 400, "the limit is 10")  # fmt: skip
    assert post(capped, "/v1/completions", {"model": "m", "prompt": "x" * 10, "max_tokens": 2}).status_code == 200  # fmt: skip


def poll_health(rt, busy: threading.Thread) -> list[float]:
    """Latencies of /health, polled for as long as ``busy`` runs."""
    latencies = []
    with httpx.Client(timeout=30) as c:
        while busy.is_alive():
            t0 = time.monotonic()
            assert c.get(rt.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            busy.join(0.05)  # a probe's pace, not a busy loop competing for the GIL
    return latencies


def concurrently(rt, path: str, body) -> tuple[httpx.Response, list[float]]:
    result = {}
    busy = threading.Thread(target=lambda: result.setdefault("r", post(rt, path, body, timeout=120)))  # fmt: skip
    busy.start()
    latencies = poll_health(rt, busy)
    busy.join()
    return result["r"], latencies


TEN_MB = "ab " * 3_400_000


def test_security_10mb_prompt_is_413_and_health_answers_meanwhile(routers):
    rt = routers()
    r, latencies = concurrently(rt, "/v1/completions", {"model": "m", "prompt": TEN_MB})
    assert_error(r, 413, "10200", "8388608", "--max-body-bytes")
    assert latencies and max(latencies) < 1.0, latencies


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_security_10mb_prompt_tokenized_off_the_event_loop(routers, path):
    """With the body and character limits raised, the 10 MB prompt is tokenized (in the
    thread pool, without the GIL) while /health keeps answering within 1 s."""
    rt = routers(max_body_bytes=32 << 20, max_prompt_chars=20_000_000)
    if path == "/v1/completions":
        body = {"model": "m", "prompt": TEN_MB}
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": TEN_MB}]}
    r, latencies = concurrently(rt, path, body)
    assert_error(r, 400, "maximum context length is 2048")
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_security_body_limit_413_for_declared_chunked_and_expect_continue(routers):
    rt = routers(max_body_bytes=64 * 1024)
    big = {"model": "m", "prompt": "x" * 70_000}
    assert_error(post(rt, "/v1/completions", big), 413, "65536", "--max-body-bytes")
    data = json.dumps(big).encode()
    chunked = httpx.post(rt.url + "/v1/completions", content=iter([data[:40_000], data[40_000:]]),
                         headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert "chunked" in chunked.request.headers.get("transfer-encoding", "")
    assert_error(chunked, 413, "sent chunked", "65536")
    # An Expect: 100-continue client hears 413 without sending its body.
    status, text = raw_request(rt, "/v1/completions", b"", {"Content-Length": str(len(data)), "Expect": "100-continue"})  # fmt: skip
    assert status == 413 and "65536" in text
    ok = {"model": "m", "prompt": "x" * 1000, "max_tokens": 2}  # under the limit: served
    assert post(rt, "/v1/completions", ok).status_code == 200


def test_security_500_carries_no_exception_text_and_releases_inflight(routers, workers, monkeypatch):  # fmt: skip
    rt = routers(max_inflight=1)

    def overflow(params):
        raise ValueError("Value out of range: 4294967296 SECRET-internal-detail")

    monkeypatch.setattr(router.run, "params_to_pb", overflow)
    for stream in (False, True):
        body = {"model": "m", "prompt": "hi", "max_tokens": 2, "stream": stream}
        for _ in range(3):  # more than max_inflight: a leak would turn these into 429s
            err = assert_error(post(rt, "/v1/completions", body), 500, "request id")
            assert "SECRET" not in json.dumps(err) and "ValueError" not in json.dumps(err)
            assert err["type"] == "server_error"
        assert rt.router.service.inflight == 0
    monkeypatch.undo()
    greedy_ok(rt, workers["model"])


def test_security_stream_error_after_the_first_token_carries_no_exception_text(routers, monkeypatch):  # fmt: skip
    rt = routers()
    real_add, calls = router.run.TextStream.add, []

    def failing_add(self, ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("SECRET-internal-detail")
        return real_add(self, ids)

    monkeypatch.setattr(router.run.TextStream, "add", failing_add)
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "ignore_eos": True, "stream": True}
    events = sse_events(post(rt, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 500 and "request id cmpl-" in err["message"] and "SECRET" not in events[-2]  # fmt: skip


def test_security_disconnect_before_first_token_frees_kv(routers, workers):
    """Remote prefill takes a minute here: the client leaves while its request holds KV
    blocks reserved on the decode worker and before any token; both are freed at once."""
    rt = routers(local_prefill_tokens=0)
    d = workers["stubs"][0]
    body = {"model": "m", "prompt": make_prompts([40], seed=72)[0], "max_tokens": 8, "stream": True}  # fmt: skip
    with socket.create_connection((rt.host, rt.port)) as sock:
        sock.sendall(raw_post("/v1/completions", body))
        assert wait_until(lambda: blocks(d)[0] < blocks(d)[1], 20), "nothing was reserved"
    assert wait_until(lambda: rt.router.service.inflight == 0, PREFILL_DELAY_S / 4)
    wait_all_free(workers["stubs"], timeout=PREFILL_DELAY_S / 4)


def never_reading_client(rt) -> socket.socket:
    """A streaming chat request (about 1.5 KB of SSE per token, 2000 tokens) from a
    client with a tiny receive buffer that never reads: the router's send blocks."""
    body = {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_completion_tokens": 2000, "ignore_eos": True, "logprobs": True, "top_logprobs": 20,
    }  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((rt.host, rt.port))
    sock.sendall(raw_post("/v1/chat/completions", body))
    assert wait_until(lambda: rt.router.service.inflight == 1, 10)
    return sock


def test_security_a_client_that_stops_reading_is_aborted(routers, workers):
    """After the stall timeout the router aborts the stream (KV freed, slot released)
    though the client's socket stays open."""
    rt = routers(stream_stall_timeout_s=1.0, request_timeout_s=600)
    with never_reading_client(rt):
        assert wait_until(lambda: rt.router.service.inflight == 0, 60), "never aborted"
        wait_all_free(workers["stubs"], timeout=10)
        cancelled = 'pdserve_requests_total{outcome="cancelled"} 1.0'
        assert cancelled in httpx.get(rt.url + "/metrics").text


def test_security_graceful_shutdown_aborts_what_is_still_in_flight(routers, workers):
    rt = routers(graceful_shutdown_s=1.0, stream_stall_timeout_s=600)
    with never_reading_client(rt):
        stopping = threading.Thread(target=rt.stop)
        stopping.start()
        stopping.join(30)
        assert not rt._thread.is_alive(), "the router waited on the stalled stream"
        assert rt.router.service.inflight == 0
        wait_all_free(workers["stubs"], timeout=10)
