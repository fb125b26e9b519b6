"""Committed protobuf stubs are current; the registry is lazy and names its choices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kv_transfer
from kv_transfer import backend_names
from kv_transfer.plane import get_backend

ROOT = Path(__file__).resolve().parents[2]
_VERSION_LINES = re.compile(r"^(# Protobuf Python Version:.*|\s+\d+,)$", re.MULTILINE)


def _normalised(text: str) -> str:
    """Drop the generator-version lines, so a newer grpcio-tools alone is not a diff."""
    return _VERSION_LINES.sub("", text)


def test_committed_stubs_are_current(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}"]
    subprocess.run([*cmd, "proto/kv_transfer.proto"], cwd=ROOT, check=True)
    fresh = (tmp_path / "proto" / "kv_transfer_pb2.py").read_text()
    committed = (ROOT / "proto" / "kv_transfer_pb2.py").read_text()
    assert _normalised(fresh) == _normalised(committed), (
        "proto/kv_transfer_pb2.py is stale; regenerate it with the command in proto/README.md"
    )


def test_backend_registry_lists_every_backend():
    assert sorted(backend_names()) == ["shm", "tcp", "torch_dist", "ucx"]
    for name in backend_names():
        assert get_backend(name).name == name


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown KV transfer backend 'rdma'; choose one of"):
        get_backend("rdma")


def test_import_is_lazy():
    code = "import sys, kv_transfer; print('ucxx' in sys.modules, 'kv_transfer.backends.ucx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_no_pickle_on_the_wire():
    sources = Path(kv_transfer.__file__).parent.rglob("*.py")
    offenders = [
        p.name for p in sources if re.search(r"\bpickle\b|\bsend_obj\b|recv_obj", p.read_text())
    ]
    assert not offenders
