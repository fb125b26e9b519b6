"""Serving behaviour over real HTTP: incremental streams, cancellation, sampling options,
bad input (documented status + OpenAI error body, service keeps serving), metrics."""

from __future__ import annotations

import json
import os

import grpc
import httpx
import openai
import pytest

from engine.config.router import RouterConfig
from engine.tokenizer import Tokenizer
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from router.server import Router
from tests.engine.hf_reference import hf_greedy, hf_top_logprobs, make_prompts
from tests.waiting import Threads, wait_until

from .conftest import MODEL_NAME, client, completion_text

LONG = {"max_tokens": 1500, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def llama(clusters):
    return clusters("llama")


@pytest.fixture(scope="module")
def rt(llama):
    return llama.router("tcp")


def decode_stats(cluster) -> pb.StatsResponse:
    (address,) = cluster.addresses("decode")
    with grpc.insecure_channel(address) as channel:
        return rpc.DecodeServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)


def post(rt, path: str, body, **kw) -> httpx.Response:
    return httpx.post(rt.url + path, json=body, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in err["message"], err
    return err


def test_stream_is_incremental_and_cancel_frees_both_workers(rt, llama):
    c = client(rt)
    stream = c.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8], stream=True, **LONG)
    chunks = iter(stream)
    next(chunks)  # the prefill worker's first token
    next(chunks)  # the decode worker's first
    # Both are here while the decode worker is still generating the other 1498 tokens.
    assert decode_stats(llama).queues["running"] == 1
    for _ in range(5):
        next(chunks)
    stream.close()  # the client goes away mid-stream
    llama.wait_all_free(timeout=5.0)


def test_non_streaming_client_timeout_aborts(rt, llama):
    body = {"model": MODEL_NAME, "prompt": [9, 8, 7], "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(rt.url + "/v1/completions", json=body, timeout=0.4)
    llama.wait_all_free(timeout=5.0)


def test_request_timeout_is_504_and_aborts(llama):
    rt = llama.router("tcp", request_timeout_s=0.5)
    body = {"model": MODEL_NAME, "prompt": [4, 5, 6], "max_tokens": 1500, "ignore_eos": True}
    assert_error(post(rt, "/v1/completions", body), 504, "timed out after 0.5s")
    llama.wait_all_free(timeout=5.0)


def test_stop_strings_and_stop_token_ids(rt, tiny_model):
    c = client(rt)
    tok = Tokenizer.from_dir(tiny_model("llama"))
    prompt = make_prompts([30], seed=51)[0]
    want = hf_greedy(tiny_model("llama"), [prompt], 24)[0]
    text = tok.decode(want)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for stream in (False, True):
        kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.0, stop=[stop])
        got, reason = completion_text(c, stream, **kw)
        assert (got, reason) == (text[: text.index(stop)], "stop")
    stop_id = want[5]
    r = c.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.0,
        extra_body={"stop_token_ids": [stop_id], "return_token_ids": True},
    )  # fmt: skip
    ids = r.choices[0].token_ids
    assert ids == want[: want.index(stop_id) + 1] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(ids[:-1])
    late = c.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.0,
        extra_body={"stop_token_ids": [stop_id], "min_tokens": 24, "return_token_ids": True},
    )  # fmt: skip
    assert stop_id not in late.choices[0].token_ids and late.choices[0].finish_reason == "length"


def test_logprobs_seed_and_usage(rt, tiny_model):
    c = client(rt)
    r = c.completions.create(
        model=MODEL_NAME, prompt=[11, 12, 13], max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    tok = Tokenizer.from_dir(tiny_model("llama"))
    want = hf_top_logprobs(tiny_model("llama"), [11, 12, 13], 5, 2)
    for step, token, chosen, top in zip(want, lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):  # fmt: skip
        expect = {tok.decode([i], skip_special_tokens=False): v for i, v in step}
        assert len(expect) == 2  # two distinct pieces: the top-2 map below is exact
        assert top == pytest.approx(expect, abs=1e-3)
        assert (token, chosen) == (tok.decode([step[0][0]], skip_special_tokens=False), pytest.approx(step[0][1], abs=1e-3))  # fmt: skip
    chat = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)

    def sample(seed: int) -> str:
        kw = dict(model=MODEL_NAME, prompt=[20, 21], max_tokens=16, temperature=1.0, seed=seed)
        return c.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7) != sample(8)
    c.completions.create(model=MODEL_NAME, prompt=list(range(40, 80)), max_tokens=2)  # warm
    again = c.completions.create(model=MODEL_NAME, prompt=list(range(40, 80)), max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == 32


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL_NAME, "prompt": "hi", "n": 17}, 400, "less than or equal to 16"),
        ({"model": MODEL_NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400, "only allowed with echo"),
        ({"model": MODEL_NAME, "prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
        ({"model": MODEL_NAME, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
        ({"model": MODEL_NAME}, 400, "prompt"),
        ({"model": MODEL_NAME, "prompt": [1, 99999]}, 400, "vocabulary"),
        ({"model": MODEL_NAME, "prompt": [5] * 2040, "max_tokens": 100}, 400, "maximum context length is 2048"),
        ({"model": MODEL_NAME, "prompt": [5] * 2048}, 400, "maximum context length is 2048"),
    ],
)  # fmt: skip
def test_bad_completions_get_documented_errors(rt, body, status, needle):
    assert_error(post(rt, "/v1/completions", body), status, needle)


def test_bad_requests_of_other_kinds_and_service_keeps_serving(rt):
    bad_json = httpx.post(
        rt.url + "/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_error(bad_json, 400)
    assert_error(
        post(rt, "/v1/chat/completions", {"model": MODEL_NAME, "messages": []}), 400, "messages"
    )
    msgs = [{"role": "wizard", "content": "x"}]
    assert_error(post(rt, "/v1/chat/completions", {"model": MODEL_NAME, "messages": msgs}), 400)
    assert_error(httpx.get(rt.url + "/v1/nothing-here"), 404)
    stream_err = post(rt, "/v1/completions", {"model": "nope", "prompt": "x", "stream": True})
    assert_error(stream_err, 404)
    with pytest.raises(openai.NotFoundError):
        client(rt).completions.create(model="nope", prompt="x")
    ok = client(rt).completions.create(model=MODEL_NAME, prompt="still here", max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_overload_is_429_and_no_worker_is_503(llama, tiny_model):
    busy = llama.router("aggregated", max_inflight=1)
    stream = client(busy).completions.create(model=MODEL_NAME, prompt=[5, 6], stream=True, **LONG)
    next(iter(stream))
    r = post(busy, "/v1/completions", {"model": MODEL_NAME, "prompt": "x"})
    assert_error(r, 429, "in flight")
    assert r.headers["retry-after"] == "1"
    stream.close()
    empty = Router(RouterConfig(str(tiny_model("llama")), MODEL_NAME), []).start_in_thread()
    try:
        r = post(empty, "/v1/completions", {"model": MODEL_NAME, "prompt": "x"})
        assert_error(r, 503, "no worker registered yet")
        assert r.headers["retry-after"] == "5"
        assert httpx.get(empty.url + "/health").status_code == 503
    finally:
        empty.stop()


def test_api_key(llama):
    secured = llama.router("aggregated", api_key="s3cret")
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
    assert_error(post(secured, "/v1/completions", body), 401, "API key")
    bad = post(secured, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
    assert_error(bad, 401)
    with pytest.raises(openai.AuthenticationError):
        client(secured).models.list()
    good = client(secured, api_key="s3cret").completions.create(**body)
    assert good.usage.completion_tokens == 2
    assert httpx.get(secured.url + "/health").status_code == 200  # probes need no key


def test_models_health_and_metrics(rt):
    models = client(rt).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = httpx.get(rt.url + "/health").json()
    assert health["status"] == "ok" and {w["role"] for w in health["workers"].values()} == {
        "prefill",
        "decode",
    }
    client(rt).completions.create(model=MODEL_NAME, prompt=list(range(3, 40)), max_tokens=4)
    names = (
        "pdserve_time_to_first_token_seconds_count",
        "pdserve_inter_token_latency_seconds_count",
        "pdserve_e2e_request_latency_seconds_count",
        "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfer_seconds_total",
    )
    gauges = (
        'pdserve_worker_queue_depth{queue="running",worker="llama-decode-0"}',
        'pdserve_kv_blocks_in_use{worker="llama-decode-0"}',
    )

    def exported() -> bool:  # the worker gauges arrive with the next Stats poll
        text = httpx.get(rt.url + "/metrics").text
        return all(g in text for g in gauges) and all(_counter(text, n) > 0 for n in names)

    wait_until(exported, timeout=10, what="every metric exported")
    text = httpx.get(rt.url + "/metrics").text
    assert 'pdserve_routing_decisions_total{path="remote",reason="cost"}' in text


def _counter(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return values[0] if values else 0.0


def test_concurrent_requests_all_complete(rt, tiny_model):
    prompts = make_prompts([12, 30, 21, 44], seed=52)
    want = hf_greedy(tiny_model("llama"), prompts, 8)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        body = {
            "model": MODEL_NAME, "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": i % 2 == 1,
        }  # fmt: skip
        r = post(rt, "/v1/completions", body)
        if body["stream"]:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            got[i] = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
        else:
            got[i] = r.json()["choices"][0]["token_ids"]

    threads = Threads()
    for i in range(len(prompts)):
        threads.start(run, i)
    threads.join(60)
    assert [got[i] for i in range(len(prompts))] == want


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering Ray's nice 15 needs CAP_SYS_NICE")
def test_ray_workers_run_at_nice_zero(llama):
    """Ray starts actors at nice 15; the launcher resets every worker thread to 0 so the
    workers are not starved by the router and clients on the same host."""
    for info in llama.infos.values():
        tids = os.listdir(f"/proc/{info['pid']}/task")
        nice = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids}
        assert set(nice.values()) == {0}, (info["worker_id"], nice)
