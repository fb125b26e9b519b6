"""The engine's parts for its place in a replica: the block manager the scheduler uses and
the driver each step goes through (one rank: the plain ones)."""

from __future__ import annotations

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.parallel.driver import LocalDriver, StepDriver, TPDriver
from engine.parallel.ep_driver import EPDriver
from engine.parallel.ep_kv import EPCacheManager
from engine.parallel.state import ParallelState


def make_kv_manager(parallel: ParallelState, layout: KVLayout, caching: bool) -> KVCacheManager:
    """Expert parallelism places each request's KV on a home rank (ep_kv.py)."""
    if parallel.ep_size > 1:
        return EPCacheManager(layout.num_blocks, layout.block_size, caching, parallel.ep_size)
    return KVCacheManager(layout.num_blocks, layout.block_size, caching)


def make_driver(parallel: ParallelState, runner: ModelRunner, kv: KVCacheManager) -> StepDriver:
    if parallel.tp_size > 1:
        return TPDriver(runner, parallel)
    if parallel.ep_size > 1:
        return EPDriver(runner, parallel, kv)
    return LocalDriver(runner)
