"""The config tree (engine/config/): one docstring per field, flags generated from it with
each default on its field, every README flag of ``pdserve serve / worker / generate``
landing on its field, and whole configs serialised to JSON and back (secrets left out)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from engine.config import (
    CacheConfig,
    EngineConfig,
    RouterConfig,
    ServeConfig,
    StateConfig,
    TransferConfig,
    WorkerConfig,
)
from engine.config.flags import add_flags, docstrings, flag_name, read_flags
from engine.config.tree import from_json, leaves, to_json, with_leaves
from engine.security import ClusterSecret
from router.launch.cli import build_parser
from router.launch.flags import serve_config, worker_config

README = Path(__file__).resolve().parents[2] / "README.md"
ROOTS = (ServeConfig, WorkerConfig, RouterConfig, EngineConfig, TransferConfig)


def _serve(*argv: str) -> ServeConfig:
    return serve_config(build_parser().parse_args(["serve", "--model", "m", *argv]))


def _worker(*argv: str) -> WorkerConfig:
    return worker_config(build_parser().parse_args(["worker", "--model", "m", *argv]))


def test_every_field_has_one_docstring():
    missing = [
        f"{leaf.owner.__name__}.{leaf.name}"
        for root in ROOTS
        for leaf in leaves(root)
        if leaf.name not in docstrings(leaf.owner)
    ]
    assert not missing


def test_flags_take_their_default_and_help_from_the_field():
    p = argparse.ArgumentParser()
    add_flags(p, EngineConfig, "engine", exclude=("parallel",))
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    assert "Tokens per KV block. (default: 16)" == helps["--block-size"]
    assert helps["--num-kv-blocks"].startswith("Blocks in the pool")
    assert "(default: the tiny demo model)" in helps["--model"]
    got = read_flags(p.parse_args(["--block-size", "32", "--no-prefix-caching"]), "engine")
    assert got == {
        "model": None,  # resolved by the command
        "device": "auto",  # resolved on the worker's own node
        "cache": {"block_size": 32, "enable_prefix_caching": False},
    }
    assert read_flags(p.parse_args([]), "engine") == {"model": None, "device": "auto"}


def test_flag_kinds_follow_the_field_types():
    p = argparse.ArgumentParser()
    add_flags(p, WorkerConfig, "w")
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    assert actions["--role"].required and actions["--role"].choices == ["prefill", "decode"]
    assert actions["--dtype"].choices == ["auto", "float32", "float16", "bfloat16"]
    assert isinstance(actions["--kv-transport"], argparse._AppendAction)
    assert actions["--kv-transport"].choices == ["shm", "tcp", "ucx", "torch_dist"]
    assert isinstance(actions["--no-prefix-caching"], argparse._StoreFalseAction)
    assert actions["--max-model-len"].type is int and actions["--stall-timeout"].type is float
    assert "--heartbeat-s" not in actions  # TransferConfig: no flags (flag(None))
    with pytest.raises(SystemExit):
        p.parse_args(["--role", "router"])


def test_one_default_per_value():
    cfg = _serve()
    assert cfg.decode.engine.cache.block_size == CacheConfig.block_size == 16
    assert cfg.state.heartbeat_ttl_s == StateConfig.heartbeat_ttl_s == 3.0
    assert cfg.router.lease_s == WorkerConfig.lease_s == 30.0
    assert cfg.decode.engine.device == "auto" and EngineConfig("m").device == "cpu"
    assert _worker("--role", "decode").kv_transports == ("tcp", "shm")


def _readme_flags(command: str) -> set[str]:
    """Every ``--flag`` the README shows for ``pdserve <command>``: on its command lines,
    their continuations and the comment lines under them."""
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S))
    found, inside, more = set(), False, False
    for line in blocks.splitlines():
        s = line.strip()
        if s.startswith((".venv/bin/pdserve ", "pdserve ")):
            inside = s.split("pdserve ", 1)[1].startswith(command + " ")
        elif not (inside and (more or s.startswith("#"))):
            inside = False
        if inside:
            found |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", s))
        more = s.endswith("\\")
    return found


@pytest.mark.parametrize("command", ["serve", "worker", "generate"])
def test_every_readme_flag_is_a_flag(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    known = {s for a in sub._actions for s in a.option_strings}
    shown = _readme_flags(command)
    assert len(shown) > 5 and shown <= known, sorted(shown - known)


def test_readme_flags_land_on_their_fields(tmp_path):
    cfg = _serve(
        "--prefill", "0", "--decode", "2", "--host", "0.0.0.0", "--port", "0",
        "--ray-address", "auto", "--node-ip", "127.0.0.3", "--ray-namespace", "ns",
        "--redis-url", "redis://r:1/0", "--heartbeat-ttl", "2", "--kv-transport", "ucx",
        "--local-prefill-tokens", "64", "--prefill-overload-factor", "0",
        "--prefill-timeout", "5", "--request-timeout", "60", "--max-inflight", "9",
        "--max-body-bytes", "4096", "--max-prompt-chars", "100", "--stream-stall-timeout",
        "3", "--graceful-shutdown-timeout", "4", "--stall-timeout", "7",
        "--served-model-name", "tiny", "--cluster-secret-file", "/s",
        "--redis-password-file", "/pw", "--prefill-ep-size", "2", "--decode-ep-size", "4",
        "--block-size", "32", "--num-kv-blocks", "99", "--dtype", "float32",
    )  # fmt: skip
    assert (cfg.num_prefill, cfg.num_decode, cfg.host, cfg.port) == (0, 2, "0.0.0.0", 0)
    assert cfg.ray == type(cfg.ray)("auto", "127.0.0.3", "ns")
    assert cfg.state == StateConfig("redis://r:1/0", 2.0, redis=cfg.state.redis)
    assert cfg.state.redis.password_file == "/pw" and cfg.cluster_secret_file == "/s"
    r = cfg.router
    assert (r.kv_transport, r.local_prefill_tokens, r.prefill_overload_factor) == ("ucx", 64, 0)
    assert (r.prefill_timeout_s, r.request_timeout_s, r.max_inflight) == (5, 60, 9)
    assert (r.max_body_bytes, r.max_prompt_chars, r.served_model_name) == (4096, 100, "tiny")
    assert (r.stream_stall_timeout_s, r.graceful_shutdown_s, r.model) == (3, 4, "m")
    for role, ep in (("prefill", 2), ("decode", 4)):
        w = getattr(cfg, role)
        assert (w.role, w.stall_timeout_s, w.engine.parallel.ep_size) == (role, 7, ep)
        assert (w.engine.cache.block_size, w.engine.cache.num_blocks) == (32, 99)
    w = _worker(
        "--role", "prefill", "--host", "10.0.0.5", "--port", "5", "--worker-id", "p0",
        "--kv-transport", "tcp", "--kv-transport", "ucx", "--ep-size", "2",
        "--redis-url", "redis://r:1/0", "--heartbeat-ttl", "4", "--stall-timeout", "9",
    )  # fmt: skip
    assert (w.role, w.host, w.port, w.worker_id) == ("prefill", "10.0.0.5", 5, "p0")
    assert (w.kv_transports, w.engine.parallel.ep_size, w.stall_timeout_s) == (("tcp", "ucx"), 2, 9)  # fmt: skip
    assert (w.state.redis_url, w.state.heartbeat_ttl_s) == ("redis://r:1/0", 4)


def test_configs_travel_whole_and_without_secrets():
    cfg = _serve("--decode-ep-size", "2", "--redis-url", "redis://r:1/0", "--api-key", "k3y")
    secret = ClusterSecret(b"0123456789abcdef-a-secret")
    worker = dataclasses.replace(cfg.decode, transfer=TransferConfig(secret=secret))
    assert from_json(ServeConfig, to_json(cfg)) == dataclasses.replace(
        cfg, router=dataclasses.replace(cfg.router, api_key=None)
    )
    text = to_json(worker)
    assert "k3y" not in to_json(cfg) and secret.key.decode() not in text
    assert from_json(WorkerConfig, text) == cfg.decode


def test_llm_overrides_name_leaves_by_field_or_flag():
    cfg = with_leaves(EngineConfig, model="m", block_size=32, num_kv_blocks=8, max_num_seqs=4)
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.scheduler.max_num_seqs) == (32, 8, 4)
    with pytest.raises(TypeError, match=r"unknown EngineConfig settings \['bogus'\]"):
        with_leaves(EngineConfig, model="m", bogus=1)
    assert flag_name(next(x for x in leaves(CacheConfig) if x.name == "num_blocks")) == "--num-kv-blocks"  # fmt: skip
