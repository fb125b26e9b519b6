"""Which parts of the config tree each command's flags come from (the flags themselves are
generated, engine/config/flags.py), and the configs built from a parsed command line.

    pdserve generate   EngineConfig (no parallel)
    pdserve worker     WorkerConfig (engine, state, the secret file, where it listens)
    pdserve serve      ServeConfig (Ray, state, HTTP, --worker, ...) + RouterConfig
                       + one worker template for both roles (engine, --stall-timeout)
                       with --prefill-ep-size / --decode-ep-size per role

Flags left off the line keep their fields' defaults. ``--model`` left off is the tiny
demo model; ``--device`` left off is auto (cuda if the worker's node has it).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from engine.config import EngineConfig, RouterConfig, ServeConfig, WorkerConfig
from engine.config.flags import add_flags, given, read_flags
from engine.config.tree import from_dict, merge
from engine.security import ENV_FILE
from engine.tiny_model import ensure_demo_model
from router.launch.secrets import api_key

ROLES = ("prefill", "decode")
SERVE_WORKER_EXCLUDE = (
    "role", "host", "port", "worker_id", "kv_transports", "state", "cluster_secret_file",
)  # fmt: skip
"""Worker fields ``pdserve serve`` sets itself (or from its own flags: state, secret)."""


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p, EngineConfig, "engine", exclude=("parallel",))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = read_flags(args, "engine")
    values["model"] = values.get("model") or str(ensure_demo_model())
    return from_dict(EngineConfig, values)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p, WorkerConfig, "worker")


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    values = read_flags(args, "worker")
    values = merge(values, {"engine": {"model": _model(values)}})
    return from_dict(WorkerConfig, values)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p, ServeConfig, "serve", exclude=("router", "prefill", "decode"))
    add_flags(p, RouterConfig, "router")
    p.add_argument("--api-key-file", default=None, help="read the Bearer key from this file")
    add_flags(p, WorkerConfig, "worker", exclude=SERVE_WORKER_EXCLUDE, per_role=ROLES)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The whole tree of one ``pdserve serve`` (the API key resolved, never serialised)."""
    template = read_flags(args, "worker")
    model = _model(template)
    template = merge(template, {"engine": {"model": model}})
    router = read_flags(args, "router")
    router.update(model=model, api_key=api_key(args.api_key_file, router.get("api_key")))
    values = read_flags(args, "serve")
    values["router"] = router
    for role in ROLES:
        values[role] = merge(merge(template, read_flags(args, role)), {"role": role})
    return from_dict(ServeConfig, values)


def launched_worker(serve: ServeConfig, role: str, authenticated: bool) -> WorkerConfig:
    """What ``serve`` hands a worker it starts: its role's config with the cluster state,
    the secret's *path* (never the value) and the KV backends the router's choice needs."""
    return replace(
        getattr(serve, role),
        state=serve.state,
        cluster_secret_file=secret_file(serve.cluster_secret_file),
        cluster_auth=authenticated,  # a worker without the secret refuses to start
        kv_transports=worker_transports(serve.router.kv_transport),
    )


def worker_transports(choice: str) -> tuple[str, ...]:
    base = ("tcp", "shm")
    return base if choice in ("auto", *base) else (*base, choice)


def secret_file(path: str | None) -> str | None:
    """The secret's path to hand to workers (a path travels; the value never does)."""
    return path or os.environ.get(ENV_FILE) or None


def _model(values: dict) -> str:
    return given(values, "engine", "model") or str(ensure_demo_model())
