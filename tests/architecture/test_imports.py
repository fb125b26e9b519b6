"""The import arrows of README's Architecture section, read from source (``imports.py``):
no cycle between files, and none of the edges the layering forbids.

Each rule names a group of modules and the groups it may import; a module's group is the
first prefix in ``GROUPS`` that it starts with. Lazy imports inside functions count too.
"""

from __future__ import annotations

import pytest

from tests.architecture.imports import ROOT, cycles, import_graph

GROUPS = (
    "router.launch.cli",
    "router.launch",
    "router.state",
    "router",
    "prefill_worker",
    "decode_worker",
    "kv_transfer",
    "engine.worker",
    "engine",
    "proto",
    "bench",
)
"""Most specific first."""

ALLOWED: dict[str, set[str]] = {
    "proto": {"proto"},
    "engine": {"engine", "proto"},
    "engine.worker": {"engine.worker", "engine", "proto"},
    "kv_transfer": {"kv_transfer", "engine", "proto"},
    "prefill_worker": {"prefill_worker", "engine", "engine.worker", "kv_transfer", "proto"},
    "decode_worker": {"decode_worker", "engine", "engine.worker", "kv_transfer", "proto"},
    "router.state": {"router.state", "engine", "engine.worker", "kv_transfer", "proto"},
    "router": {"router", "router.state", "engine", "engine.worker", "kv_transfer", "proto"},
    "router.launch": set(GROUPS) - {"router.launch.cli", "bench"},
    "router.launch.cli": set(GROUPS),
    "bench": set(GROUPS) - {"router.launch.cli"},
}

KV_TRANSFER_ENGINE = (
    "engine.kv_cache",
    "engine.config",
    "engine.security",
    "engine.kernels.cpu_kv_copy",
)
"""The parts of engine kv_transfer builds on: the KV layout (and its shared pool), its
config, the secret, and the C block-copy / CRC32C helpers."""
ROUTER_KV_TRANSFER = ("kv_transfer.wire",)
"""What the router and the cluster state take from kv_transfer: wire conversions only."""


def group(module: str) -> str:
    return next(g for g in GROUPS if module == g or module.startswith(g + "."))


def _narrow(src: str, dst: str) -> bool:
    """The finer limits inside an allowed group edge."""
    if group(src) == "kv_transfer" and group(dst) in ("engine", "engine.worker"):
        return dst.startswith(KV_TRANSFER_ENGINE)
    if group(src) in ("router", "router.state") and group(dst) == "kv_transfer":
        return dst.startswith(ROUTER_KV_TRANSFER)
    return True


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if group(dst) not in ALLOWED[group(src)] or not _narrow(src, dst):
                bad.append(f"{src} -> {dst}")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_every_project_module_has_a_group(graph):
    assert all(group(m) for m in graph)


def test_no_import_cycle_between_files(graph):
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_forbidden_import_edge(graph):
    bad = forbidden_edges(graph)
    assert not bad, f"{len(bad)} forbidden import edges:\n" + "\n".join(bad)


def test_the_workers_never_import_each_other(graph):
    both = [
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if {group(src), group(dst)} == {"prefill_worker", "decode_worker"}
    ]
    assert not both


def test_nothing_imports_the_cli(graph):
    assert not [m for m, targets in graph.items() if "router.launch.cli" in targets]


def test_the_rules_catch_a_broken_layering():
    """The checks themselves: a cycle and each kind of forbidden edge are found."""
    broken = {
        "engine.a": {"router.b"},
        "router.b": {"engine.a"},
        "proto.c": {"engine.a"},
        "prefill_worker.d": {"decode_worker.e"},
        "decode_worker.e": set(),
        "kv_transfer.f": {"engine.worker.g", "router.b"},
        "engine.worker.g": set(),
        "router.h": {"router.launch.i", "kv_transfer.f"},
        "router.launch.i": {"bench.j"},
        "bench.j": {"router.launch.cli"},
        "router.launch.cli": set(),
    }
    assert cycles(broken) == [["engine.a", "router.b"]]
    assert set(forbidden_edges(broken)) == {
        "engine.a -> router.b",
        "proto.c -> engine.a",
        "prefill_worker.d -> decode_worker.e",
        "kv_transfer.f -> engine.worker.g",
        "kv_transfer.f -> router.b",
        "router.h -> router.launch.i",
        "router.h -> kv_transfer.f",
        "router.launch.i -> bench.j",
        "bench.j -> router.launch.cli",
    }
