"""The config tree: nested frozen dataclasses, one docstring per field, one default per
value (README, Architecture)."""

from engine.config.engine import CacheConfig, DTypeName, EngineConfig, SchedulerConfig

__all__ = ["CacheConfig", "DTypeName", "EngineConfig", "SchedulerConfig"]
