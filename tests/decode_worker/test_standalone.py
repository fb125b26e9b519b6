"""`pdserve worker --role decode` runs one worker without Ray and stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from proto import worker_pb2 as pb
from proto import worker_pb2_grpc as rpc

from .inproc import spec, tokens

ROOT = Path(__file__).resolve().parents[2]


def test_standalone_decode_worker(tiny_model):
    cmd = [sys.executable, "-m", "router.launch.cli", "--log-level", "WARNING", "worker"]
    cmd += ["--role", "decode", "--model", str(tiny_model("llama")), "--host", "127.0.0.1"]
    cmd += ["--num-kv-blocks", "32", "--worker-id", "solo", "--kv-transport", "tcp"]
    cmd += ["--port", "0"]  # the worker binds a free port and reports it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert re.fullmatch(r"decode worker solo serving on 127\.0\.0\.1:[1-9]\d*", line.strip()), (
            line
        )
        address = line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            stub = rpc.DecodeServiceStub(channel)
            info = stub.Info(pb.InfoRequest(), timeout=10)
            assert (info.role, info.num_blocks, list(info.kv_transports)) == ("decode", 32, ["tcp"])
            assert len(tokens(stub.Generate(spec("s", [5, 6, 7]), timeout=30))) == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
