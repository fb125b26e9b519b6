"""What a decode worker needs of its engine before the engine is built (the role's
``prepare``, engine/worker/roles.py), and the KV endpoints it serves once it is."""

from __future__ import annotations

from dataclasses import replace

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.security import ClusterSecret
from kv_transfer import KVEndpoint, make_endpoint


def prepare(config: WorkerConfig) -> WorkerConfig:
    """Serving shm: the KV cache in shared memory, so a prefill worker on this host writes
    each layer straight into the reserved blocks (kv_transfer/backends/shm_pool.py)."""
    cache = config.engine.cache
    if "shm" not in config.kv_transports or cache.shared_memory:
        return config
    engine = replace(config.engine, cache=replace(cache, shared_memory=True))
    return replace(config, engine=engine)


def _transport_frees_nothing(block_ids: list[int]) -> None:
    """The engine thread frees a failed transfer's blocks on its ``TransferDone``."""


def make_endpoints(
    engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None
) -> dict[str, KVEndpoint]:
    """One KV endpoint per enabled transport, receiving into ``engine``'s cache."""
    tcfg = replace(config.transfer, host=config.host, secret=config.transfer.secret or secret)
    return {
        name: make_endpoint(
            name,
            engine.layout,
            engine.kv_caches,
            engine.rank_layout_spec,
            _transport_frees_nothing,
            config=tcfg,
        )  # fmt: skip
        for name in config.kv_transports
    }
