"""A standalone ``pdserve worker`` whose engine loop dies fails its in-flight stream with a
clear UNAVAILABLE (not a hang) and exits non-zero with the reason logged, so whatever
supervises it restarts it. The loop is killed through a test-only launcher of the real
CLI (tests/decode_worker/faulty_worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from engine.sampling_params import SamplingParams
from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc

from .inproc import spec

ROOT = Path(__file__).resolve().parents[2]
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_security_standalone_worker_exits_nonzero_when_its_loop_dies(tiny_model, tmp_path, role):
    cmd = [sys.executable, "-m", "tests.decode_worker.faulty_worker", "--log-level", "INFO"]
    cmd += ["worker", "--role", role, "--model", str(tiny_model("llama")), "--port", "0"]
    cmd += ["--host", "127.0.0.1", "--num-kv-blocks", "32", "--worker-id", f"solo-{role}"]
    cmd += ["--stall-timeout", "30"]
    log = tmp_path / "worker.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"worker solo-{role} serving on 127.0.0.1:" in line, log.read_text()[-2000:]
        with grpc.insecure_channel(line.split()[-1]) as channel:
            if role == "decode":
                stub = rpc.DecodeServiceStub(channel)
                call = stub.Generate(spec("inflight", [5, 6, 7], LONG), timeout=30)
                assert next(call).tokens  # generating when the loop dies
            else:
                stub = rpc.PrefillServiceStub(channel)
            assert stub.Health(pb.HealthRequest(), timeout=5).serving
            proc.send_signal(signal.SIGUSR1)
            if role == "decode":
                with pytest.raises(grpc.RpcError) as exc:
                    list(call)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"the engine loop of solo-{role} failed" in exc.value.details()
        assert proc.wait(timeout=30) == 1
        text = log.read_text()
        assert f"the engine loop of solo-{role} failed (RuntimeError: injected" in text
        assert "the worker restarts; exiting" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
