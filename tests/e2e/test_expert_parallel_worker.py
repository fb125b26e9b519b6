"""`pdserve worker --ep-size 2` (no Ray: the leader spawns its follower process on this
host, `start_local_group`): greedy output equals HF with concurrent requests spread
over both ranks; a killed follower ends the in-flight stream (decode) or prefill (prefill
worker) within seconds with an error naming the dead rank, and every EP process exits;
SIGTERM stops leader and follower."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc
from tests.decode_worker.inproc import spec, start, stub, tokens, wait_all_free
from tests.e2e.group_faults import wait_gone
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.processes import children
from tests.waiting import Threads

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


@contextlib.contextmanager
def _ep_process(model: Path, role: str, worker_id: str, *extra: str):
    """``pdserve worker --ep-size 2`` as a real process: ``(proc, follower_pid, channel)``."""
    cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "WARNING", "worker"]
    cmd += ["--role", role, "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--num-kv-blocks", "128", "--worker-id", worker_id, "--kv-transport", "tcp"]
    cmd += ["--ep-size", "2", "--port", "0", *extra]  # it binds a free port and reports it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert re.fullmatch(rf"{role} worker {worker_id} serving on 127\.0\.0\.1:[1-9]\d*", line.strip()), line  # fmt: skip
        followers = children(proc.pid)
        assert len(followers) == 1, followers
        with grpc.insecure_channel(line.split()[-1]) as channel:
            yield proc, followers[0], channel
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def ep_worker(tiny_model):
    model = tiny_model("mixtral")
    with _ep_process(model, "decode", "ep2") as (proc, follower, channel):
        yield model, proc, follower, rpc.DecodeServiceStub(channel)


def test_local_ep2_worker_equals_hf_and_stops(ep_worker):
    model, proc, follower, stub = ep_worker
    prompts = make_prompts([23, 40, 7, 15], seed=91)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = tokens(stub.Generate(spec(f"g{i}", prompts[i], GREEDY), timeout=60))

    threads = Threads()
    for i in range(len(prompts)):
        threads.start(run, i)
    threads.join(timeout=90)
    assert [got.get(i) for i in range(len(prompts))] == hf_greedy(model, prompts, 10)
    stats = stub.Stats(pb.StatsRequest(), timeout=10)
    assert stats.ep_size == 2 and sum(stats.expert_tokens) > 0
    assert stats.num_free_blocks == stats.num_blocks == 128
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    wait_gone([follower], timeout=20)


def test_killed_follower_fails_the_stream_naming_the_rank(ep_worker):
    _, proc, follower, stub = ep_worker
    stream = stub.Generate(spec("long", make_prompts([12], seed=92)[0], LONG), timeout=60)
    next(stream)  # decoding is under way on both ranks
    t0 = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 15
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"EP rank 1 (pid {follower}) died" in err.value.details(), err.value.details()
    assert "expert-parallel group of ep2 failed" in err.value.details()
    assert proc.wait(timeout=15) != 0  # the leader exits for its supervisor to restart
    wait_gone([follower], timeout=5)


def test_killed_follower_fails_the_prefill_naming_the_rank(tiny_model):
    """Prefill EP=2: a 900-token prompt in 4-token chunks is still prefilling when the
    follower dies; the Prefill call fails naming the rank, the KV stream is aborted (the
    decode worker gets its reserved blocks back) and the leader exits."""
    model = tiny_model("mixtral")
    decode = start("decode", model)
    dstub, dchannel = stub(decode)
    prompt = make_prompts([900], seed=93)[0]
    try:
        with _ep_process(model, "prefill", "epp", "--max-num-batched-tokens", "4") as (
            proc,
            follower,
            channel,
        ):
            pstub = rpc.PrefillServiceStub(channel)
            res = dstub.Reserve(
                pb.ReserveRequest(request=spec("pk", prompt), kv_transport="tcp", lease_s=60)
            )
            call = pstub.Prefill.future(
                pb.PrefillRequest(request=spec("pk", prompt), ticket=res.ticket), timeout=60
            )
            deadline = time.monotonic() + 20
            while pstub.Stats(pb.StatsRequest(), timeout=5).num_requests == 0:
                assert time.monotonic() < deadline and not call.done(), "prefill never started"
                time.sleep(0.005)
            os.kill(follower, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=15)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"EP rank 1 (pid {follower}) died" in err.value.details(), err.value.details()
            assert "expert-parallel group of epp failed" in err.value.details()
            assert proc.wait(timeout=15) != 0
            wait_gone([follower], timeout=5)
        wait_all_free([dstub], timeout=10)  # the aborted stream freed the reservation
    finally:
        dchannel.close()
        decode.stop()
