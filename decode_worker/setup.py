"""What a decode worker needs of its engine before the engine is built (the role's
``prepare``, engine/worker/roles.py)."""

from __future__ import annotations

from dataclasses import replace

from engine.config import WorkerConfig


def prepare(config: WorkerConfig) -> WorkerConfig:
    """Serving shm: the KV cache in shared memory, so a prefill worker on this host writes
    each layer straight into the reserved blocks (kv_transfer/backends/shm_pool.py)."""
    cache = config.engine.cache
    if "shm" not in config.kv_transports or cache.shared_memory:
        return config
    engine = replace(config.engine, cache=replace(cache, shared_memory=True))
    return replace(config, engine=engine)
