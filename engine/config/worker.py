"""``WorkerConfig``: one worker process (its role, engine, KV transfer plane, cluster state
and where it listens). It travels whole to Ray actors and EP follower processes
(engine/config/tree.py); secrets travel as file paths, read on the worker's own node."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from engine.config.engine import EngineConfig
from engine.config.fields import flag
from engine.config.state import StateConfig
from engine.config.transfer import TransferConfig

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
Transport = Literal["shm", "tcp", "ucx", "torch_dist"]

LEASE_S = 30.0
"""Default lease of a KV reservation: the router asks for it (``RouterConfig.lease_s``), a
decode worker applies it to a ``Reserve`` that names none and to a prefilled request
waiting for its ``Decode`` call."""


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process."""

    role: Role
    """prefill: computes prompts and streams their KV; decode: receives KV and decodes
    (and prefills locally)."""
    engine: EngineConfig
    transfer: TransferConfig = field(default_factory=TransferConfig, metadata=flag(None))
    """The KV plane's tuning and backend options (no flags; ``host`` and ``secret`` are
    filled from this worker's)."""
    state: StateConfig = field(default_factory=StateConfig)
    host: str | None = None
    """gRPC and KV endpoint bind address (default: this node's address, never 0.0.0.0)."""
    port: int = 0
    """gRPC port (0 = any free port)."""
    worker_id: str | None = None
    """Name in logs and metrics (default: <role>-<pid>)."""
    kv_transports: tuple[Transport, ...] = field(
        default=("tcp", "shm"), metadata=flag("--kv-transport")
    )
    """KV backends to serve (decode: an endpoint each) or send with (prefill); repeatable."""
    lease_s: float = field(default=LEASE_S, metadata=flag(None))
    """Decode: how long a prefilled request may wait for its Decode call."""
    stall_timeout_s: float = field(default=60.0, metadata=flag("--stall-timeout"))
    """Seconds one engine step may run before the worker's Health reports it stalled and
    routers stop sending it requests (keep it above the slowest step)."""
    cluster_secret_file: str | None = field(default=None, metadata=flag("--cluster-secret-file"))
    """Authenticate worker gRPC and the KV plane with the secret in this file (default:
    $PDSERVE_CLUSTER_SECRET_FILE, else $PDSERVE_CLUSTER_SECRET; none = unauthenticated)."""
    cluster_auth: bool = field(default=False, metadata=flag(None))
    """The router authenticates its calls: a worker that finds no secret refuses to start."""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        if not self.kv_transports:
            raise ValueError("kv_transports is empty; pass at least one, e.g. --kv-transport tcp")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.host in ("0.0.0.0", "::", ""):
            logger.warning("worker %s binds every interface (%r)", self.role, self.host)

    @property
    def name(self) -> str:
        return self.worker_id or f"{self.role}-{os.getpid()}"
