"""The worker role registry: role name -> (worker class, service class, gRPC service,
follower-rank part).

Only a protocol and a registry live here; launch fills it (router/launch/roles.py), so the
shared layer never imports a role, and starting a worker (engine/worker/host.py) looks
its role up instead of branching on the name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.parallel.driver import FollowerRole
from engine.security import ClusterSecret
from engine.worker.loop import EngineLoop


class RoleWorker(Protocol):
    """A role's worker: engine + its engine thread + the role's tables and transports."""

    engine: LLMEngine
    config: WorkerConfig
    loop: EngineLoop

    def kv_transports(self) -> list[str]:
        """``Info``: decode, the KV endpoints it serves; prefill, those it may send with."""

    def transfer_stats(self) -> dict[str, int]:
        """``Stats``: KV endpoint counters (thread-safe; empty for a prefill worker)."""

    def fail_all(self, why: str) -> None:
        """Engine thread: end every request with UNAVAILABLE (the engine cannot go on)."""

    def close(self) -> None: ...


class RoleService(Protocol):
    """A role's own rpcs (the common ones are engine/worker/service.py's)."""

    def methods(self) -> Mapping[str, Callable]:
        """rpc name -> coroutine (async generator for a streaming rpc)."""


@dataclass(frozen=True)
class WorkerRole:
    name: str
    worker: Callable[[LLMEngine, WorkerConfig, ClusterSecret | None], RoleWorker]
    service: Callable[[RoleWorker], RoleService]
    grpc_service: str
    """Its service in proto/worker.proto, e.g. ``DecodeService``."""
    follower: Callable[[LLMEngine, WorkerConfig, ClusterSecret | None], FollowerRole] | None = None
    """What the role runs on a follower rank of a TP group (its own KV transfers)."""
    prepare: Callable[[WorkerConfig], WorkerConfig] | None = None
    """What the role needs of its engine, applied before the engine is built (decode: a
    KV cache in shared memory when it serves shm)."""


_ROLES: dict[str, WorkerRole] = {}


def register_role(role: WorkerRole) -> None:
    _ROLES[role.name] = role


def get_role(name: str) -> WorkerRole:
    try:
        return _ROLES[name]
    except KeyError:
        raise ValueError(
            f"unknown worker role {name!r}; registered: {sorted(_ROLES)} (launch registers "
            "them: router/launch/roles.py)"
        ) from None
