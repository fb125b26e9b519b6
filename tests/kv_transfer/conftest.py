"""Fixtures for the KV transfer conformance suite: every test runs on every backend, and
shm twice: ``shm`` into a shared KV pool (the sender writes the destination blocks in
place, as into a decode worker's pool) and ``shm-regions`` into a private cache (through
shared regions).

A ``BlockPool`` stands in for the decode engine's allocator; after each test every
block must be back in it (no leaks), whatever the test did, and no block was freed twice
(the endpoint's threads free blocks: a double free is recorded and fails the test).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.shared_pool import SharedKVPool
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import TransferConfig, backend_names, make_client, make_endpoint

NUM_BLOCKS = 64
FAST = TransferConfig(
    heartbeat_s=0.2,
    peer_timeout_s=30.0,
    reap_interval_s=0.02,
    chunk_bytes=512,
    plane={"shm_region_bytes": "1024", "shm_regions": "2", "run_min_bytes": "512"},
)
"""Small chunks and shm regions, so even tiny test layers go through several data-path
messages and the shm backend splits every layer into several descriptors; runs of two
blocks already go straight from and into the caches (torch_dist, ucx: messages.py). The peer
timeout is long: on a busy 2-core machine a heartbeat thread can be starved for seconds,
and a healthy transfer must not fail for it (the dead-peer tests use ``DEATH``)."""
DEATH = replace(FAST, peer_timeout_s=TransferConfig.peer_timeout_s)
"""The dead-peer tests: the default peer timeout (3 s)."""
PEER_DEATH_BOUND_S = DEATH.peer_timeout_s + 3.0
"""A dead peer is noticed one peer timeout after its last frame; the rest is a margin for
a busy machine (the lease, 60 s in those tests, would fail the transfer much later)."""


VARIANTS = {**{name: name for name in backend_names()}, "shm-regions": "shm"}
"""Fixture id -> backend name."""


def backend_name(variant: str) -> str:
    return VARIANTS[variant]


def allocate_dst(variant: str, layout: KVLayout):
    """``(pool, caches)``: the destination caches of ``variant``, in a shared KV pool for
    ``shm`` (``pool`` is None otherwise; the caller closes it)."""
    if variant == "shm":
        pool = SharedKVPool.create(layout)
        return pool, pool.caches
    return None, layout.allocate()


def tiny_layout(dtype: torch.dtype = torch.float32, block_size: int = 4) -> KVLayout:
    return KVLayout(
        num_layers=4,
        num_blocks=NUM_BLOCKS,
        block_size=block_size,
        num_kv_heads=2,
        head_dim=8,
        dtype=dtype,
    )


def random_caches(layout: KVLayout, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(layout.cache_shape, generator=g).to(layout.dtype) for _ in range(2))
        for _ in range(layout.num_layers)
    ]


class BlockPool:
    """Thread-safe free set standing in for the decode engine's block pool."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.total = num_blocks
        self._free = set(range(num_blocks))
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.double_frees: list[list[int]] = []
        """Blocks freed twice (recorded: ``free`` runs on the endpoint's threads)."""

    def allocate(self, n: int) -> list[int]:
        """``n`` scattered (non-contiguous, unordered) free blocks."""
        with self._lock:
            ids = self._rng.sample(sorted(self._free), n)
            self._free.difference_update(ids)
            return ids

    def take(self, ids: list[int]) -> None:
        """Allocate exactly ``ids`` (free ones)."""
        with self._lock:
            assert self._free.issuperset(ids), (
                f"blocks {sorted(set(ids) - self._free)} are not free"
            )
            self._free.difference_update(ids)

    def free(self, ids: list[int]) -> None:
        with self._lock:
            if twice := self._free.intersection(ids):
                self.double_frees.append(sorted(twice))
            self._free.update(ids)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)


@dataclass
class Pair:
    """A receiver endpoint and a sender client for one backend, plus their caches."""

    backend: str
    variant: str
    layout: KVLayout
    spec: KVLayoutSpec
    pool: BlockPool
    endpoint: object
    client: object
    src: list[tuple[torch.Tensor, torch.Tensor]]
    dst: list[tuple[torch.Tensor, torch.Tensor]]
    kv_pool: SharedKVPool | None = None


@pytest.fixture(params=list(VARIANTS))
def backend(request) -> str:
    """A variant (``VARIANTS``): the backend name, or ``shm-regions``."""
    return request.param


@pytest.fixture
def make_pair(backend) -> Callable[..., Pair]:
    """``make_pair(dtype=..., block_size=...)``; closes everything and checks for leaks."""
    made: list[Pair] = []
    name = backend_name(backend)

    def make(dtype: torch.dtype = torch.float32, block_size: int = 4, config=FAST) -> Pair:
        layout = tiny_layout(dtype, block_size)
        spec = KVLayoutSpec.from_layout(layout, "test-model")
        pool = BlockPool(NUM_BLOCKS, seed=len(made))
        kv_pool, dst = allocate_dst(backend, layout)
        endpoint = make_endpoint(name, layout, dst, spec, pool.free, config=config)
        client = make_client(name, spec, config=config)
        src = random_caches(layout, 1)
        pair = Pair(name, backend, layout, spec, pool, endpoint, client, src, dst, kv_pool)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.client.close()
        pair.endpoint.close()
        if pair.kv_pool is not None:
            pair.kv_pool.close()
        assert not pair.pool.double_frees, f"blocks freed twice on {pair.backend}: {pair.pool.double_frees}"  # fmt: skip
        assert pair.pool.num_free == pair.pool.total, (
            f"{pair.pool.total - pair.pool.num_free} KV blocks leaked on {pair.backend}"
        )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - start
