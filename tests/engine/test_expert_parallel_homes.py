"""Home ranks for data-parallel attention under EP (no processes): which rank holds each
block's KV, prefix hits only on their own home, least-loaded placement (exact block ids);
the placement wraps the plain block manager (engine/parallel/ep_kv.py)."""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.parallel.ep_kv import EPCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

T = list(range(100, 116))  # 4 blocks of 4 tokens


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_blocks_remember_their_home_and_hits_stay_on_it():
    kv = EPCacheManager(num_blocks=8, block_size=4)
    a = _req("a", T[:10])
    assert kv.allocate(a, 10, kv.find_prefix(a), home=1)
    assert kv.block_ids("a") == [0, 1, 2] and kv.home("a") == 1
    assert [kv.block_home(b) for b in range(4)] == [1, 1, 1, 0]
    b = _req("b", T[:9] + [7])
    hit = kv.find_prefix(b)
    assert [x.block_id for x in hit.blocks] == [0, 1] and hit.home == 1
    miss = kv.find_prefix(b, home=0)  # rank 0 does not hold blocks 0, 1
    assert miss.blocks == [] and miss.num_tokens == 0 and miss.home is None
    kv.free("a")
    assert kv.home("a") == 0  # forgotten with its blocks


def test_hit_chain_stops_at_the_first_block_of_another_rank():
    kv = EPCacheManager(num_blocks=8, block_size=4)
    a = _req("a", T[:9])
    assert kv.allocate(a, 9, kv.find_prefix(a), home=1)  # blocks 0, 1 cache T[0:8] on 1
    b = _req("b", T[:13])
    assert kv.find_prefix(b, home=0).blocks == []
    assert kv.allocate(b, 13, kv.find_prefix(b, home=0), home=0)  # its T[8:12] is new
    assert kv.block_ids("b") == [3, 4, 5, 6] and kv.block_home(5) == 0
    c = _req("c", T[:13] + [1])
    hit = kv.find_prefix(c)  # blocks 0, 1 (home 1), then block 5 (home 0): stop
    assert [x.block_id for x in hit.blocks] == [0, 1] and hit.home == 1
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 8


def test_pick_home_prefers_the_hit_then_the_least_loaded_rank():
    kv = EPCacheManager(num_blocks=16, block_size=4)
    assert EPCacheManager(4, 4, num_ranks=1).pick_home(kv.find_prefix(_req("x", [1, 2]))) == 0
    homes = []
    for i, n in enumerate([6, 2, 3]):
        r = _req(f"r{i}", [50 + i] * n)
        home = kv.pick_home(kv.find_prefix(r))
        assert kv.allocate(r, n, kv.find_prefix(r), home=home)
        homes.append(home)
    # r2 ties on requests (1 each) and goes where fewer blocks are held.
    assert homes == [0, 1, 1] and kv.home_load() == [(1, 2), (2, 2)]
    d = _req("d", T[:5])
    assert kv.pick_home(kv.find_prefix(d)) == 0  # fewer requests on rank 0
    assert kv.allocate(d, 5, kv.find_prefix(d), home=0)
    assert kv.home_load() == [(2, 4), (2, 2)]
    e = _req("e", T[:4] + [9, 9])
    assert kv.pick_home(kv.find_prefix(e)) == 0  # its hit lives on the busier rank 0


def test_scheduler_gives_each_sequence_its_home():
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8)
    kv = EPCacheManager(32, 4, num_ranks=2)
    s = Scheduler(cfg, kv, max_model_len=1000)
    for i in range(3):
        s.add(_req(f"q{i}", [10 + i] * 6))
    so = s.schedule()
    assert [(q.request_id, kv.home(q.request_id)) for q in so.sequences] == [
        ("q0", 0),
        ("q1", 1),
        ("q2", 0),
    ]
    assert [kv.block_home(b) for b in so.sequences[1].block_ids] == [1, 1]
