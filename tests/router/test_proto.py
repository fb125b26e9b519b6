"""The worker control plane schema: committed stubs are current, every rpc is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|\s+\d+,|GRPC_GENERATED_VERSION = .*)$", re.MULTILINE
)


def test_worker_stubs_are_current(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}"]
    cmd += [f"--grpc_python_out={tmp_path}", "proto/worker.proto"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    for name in ("worker_pb2.py", "worker_pb2_grpc.py"):
        fresh = _VERSION_LINES.sub("", (tmp_path / "proto" / name).read_text())
        committed = _VERSION_LINES.sub("", (ROOT / "proto" / name).read_text())
        assert fresh == committed, f"proto/{name} is stale; regenerate (see proto/README.md)"


def test_every_rpc_has_a_doc_comment():
    lines = (ROOT / "proto" / "worker.proto").read_text().splitlines()
    rpcs = [i for i, line in enumerate(lines) if line.strip().startswith("rpc ")]
    assert len(rpcs) == 13
    for i in rpcs:
        assert lines[i - 1].strip().startswith("//"), f"undocumented: {lines[i].strip()}"


def test_services_offer_the_documented_rpcs():
    from proto import worker_pb2

    services = worker_pb2.DESCRIPTOR.services_by_name
    prefill = {m.name for m in services["PrefillService"].methods}
    decode = {m.name for m in services["DecodeService"].methods}
    assert {"Prefill", "Abort", "Health", "Info"} <= prefill
    assert {"Reserve", "Decode", "Generate", "Abort", "Health", "Info", "Stats"} <= decode
    assert services["DecodeService"].methods_by_name["Decode"].server_streaming


def test_no_pickle_in_the_serving_path():
    dirs = ["router", "prefill_worker", "decode_worker", "proto"]
    offenders = [
        str(p.relative_to(ROOT))
        for d in dirs
        for p in (ROOT / d).rglob("*.py")
        if re.search(r"\bpickle\b|cloudpickle", p.read_text())
    ]
    assert not offenders
