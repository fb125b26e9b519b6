"""Block pool and cache manager with exact block ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hashing import ROOT_HASH, hash_block, hash_blocks
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.engine.hash_spec import (
    PINNED_1_TO_4,
    PINNED_1_TO_9_BS4,
    PINNED_100_TO_149_BS16,
    spec_block,
    spec_chain,
)


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def test_allocate_takes_lowest_ids_and_free_returns_them_tail_first():
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    assert pool.num_free_blocks == 3
    pool.free(a)
    assert pool.num_free_blocks == 6
    # 3, 4, 5 were never used; then 2, 1, 0 (tail first)
    assert [b.block_id for b in pool.allocate(6)] == [3, 4, 5, 2, 1, 0]


def test_double_free_is_an_error():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="double free of KV block 0"):
        pool.free(blocks)


def test_allocate_more_than_free_fails_without_change():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3 KV blocks, only 2 free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_chained_hash_is_stable_and_depends_on_parent():
    h0 = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert h0 == PINNED_1_TO_4 == spec_block(0, [1, 2, 3, 4])  # pinned: the router needs it
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(ROOT_HASH, [5, 6, 7, 8])
    chain = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert chain == PINNED_1_TO_9_BS4 == spec_chain(list(range(1, 10)), 4)
    assert chain[1] == hash_block(h0, [5, 6, 7, 8])
    assert hash_blocks(list(range(100, 150)), 16) == PINNED_100_TO_149_BS16


def test_hash_is_the_same_in_another_process():
    """Another interpreter with another ``PYTHONHASHSEED`` gets the pinned value too."""
    code = "from engine.kv_cache.hashing import hash_blocks; print(hash_blocks(list(range(100, 150)), 16))"  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(PINNED_100_TO_149_BS16)


def test_lookup_checks_tokens_on_hit():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, 1234, [1, 2])
    assert pool.lookup(1234, [1, 2]) is block
    assert pool.lookup(1234, [9, 9]) is None  # a colliding hash never aliases KV


def test_cached_free_block_is_evicted_lazily_in_lru_order():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, 11, [1])
    pool.cache(b, 22, [2])
    pool.free([a])
    pool.free([b])
    pool.free([c])
    assert pool.num_cached_blocks() == 2
    (first,) = pool.allocate(1)  # oldest freed: a, evicted now
    assert first.block_id == 0 and pool.lookup(11, [1]) is None
    assert pool.lookup(22, [2]) is b
    stored, evicted = pool.drain_events()
    assert stored == [11, 22] and evicted == [11]


def test_manager_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r1 = _req("a", list(range(10)))
    assert kv.allocate(r1, 10, kv.find_prefix(r1))
    assert kv.block_ids("a") == [0, 1, 2]
    r2 = _req("b", list(range(8)) + [99, 98])
    hit = kv.find_prefix(r2)
    assert [b.block_id for b in hit.blocks] == [0, 1] and hit.num_tokens == 8
    assert kv.allocate(r2, 2, hit)
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.blocks[0].ref_cnt == 2
    r3 = _req("c", list(range(8)))  # entirely cached: the last block is recomputed
    hit3 = kv.find_prefix(r3)
    assert hit3.num_tokens == 4
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 10


def test_manager_refuses_when_short_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r = _req("a", list(range(20)))
    assert not kv.allocate(r, 20)
    assert kv.num_free_blocks == 3 and not kv.holds("a")


def test_manager_counts_free_cached_hits_as_reclaimable():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    r1 = _req("a", list(range(8)))
    assert kv.allocate(r1, 8)
    kv.free("a")  # both blocks stay cached, and free
    r2 = _req("b", list(range(8)) + [7, 7, 7, 7])
    hit = kv.find_prefix(r2)
    assert hit.num_tokens == 8
    # needs 3 blocks: 2 hits (free, reclaimable) + 1 new out of the 1 remaining
    assert kv.allocate(r2, 4, hit)
    assert kv.num_free_blocks == 0
    kv.free("b")
    assert kv.num_free_blocks == 3
