"""The config tree: nested frozen dataclasses, one docstring per field, one default per
value (README, Architecture)."""

from engine.config.engine import (
    CacheConfig,
    DTypeName,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_device,
    resolve_dtype,
)
from engine.config.router import RouterConfig
from engine.config.serve import RayConfig, ServeConfig
from engine.config.state import RedisOptions, StateConfig
from engine.config.transfer import TransferConfig
from engine.config.worker import LEASE_S, Role, Transport, WorkerConfig

__all__ = [
    "LEASE_S",
    "CacheConfig",
    "DTypeName",
    "EngineConfig",
    "ParallelConfig",
    "RayConfig",
    "RedisOptions",
    "Role",
    "RouterConfig",
    "SchedulerConfig",
    "ServeConfig",
    "StateConfig",
    "TransferConfig",
    "Transport",
    "WorkerConfig",
    "resolve_device",
    "resolve_dtype",
]
