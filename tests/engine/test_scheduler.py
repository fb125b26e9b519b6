"""Scheduler: token budget, chunked prefill, preemption by recompute, abort at any time."""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SampledToken


def _sched(budget=8, blocks=16, block_size=4, chunked=True, max_seqs=8) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked
    )
    return Scheduler(cfg, KVCacheManager(blocks, block_size), max_model_len=1000)


def _req(rid, n, max_tokens=4) -> Request:
    base = 1000 * (ord(rid[0]) - ord("a") + 1)  # distinct prompts: no prefix-cache hits
    return Request(
        rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )


def _step(s: Scheduler, token=7):
    so = s.schedule()
    sampled = {q.request_id: SampledToken(token) for q in so.sequences if q.sample}
    s.update(so, sampled)
    return so


def test_chunked_prefill_splits_prompt_by_budget():
    s = _sched(budget=8)
    s.add(_req("a", 20))
    chunks = [[(q.start_pos, q.num_tokens, q.sample) for q in _step(s).sequences] for _ in range(3)]
    assert chunks == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    assert s.requests["a"].output_token_ids == [7]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = _sched(budget=8, chunked=False)
    s.add(_req("a", 5))
    s.add(_req("b", 5))
    so = s.schedule()
    assert [q.request_id for q in so.sequences] == ["a"]


def test_decodes_come_first_and_share_the_budget_with_prefill():
    s = _sched(budget=8)
    s.add(_req("a", 3))
    _step(s)  # a prefilled, has 1 output token
    s.add(_req("b", 12))
    so = _step(s)
    assert [(q.request_id, q.num_tokens) for q in so.sequences] == [("a", 1), ("b", 7)]
    assert so.num_decodes == 1


def test_preemption_frees_blocks_and_recomputes_later():
    s = _sched(budget=64, blocks=4, block_size=4)
    s.add(_req("a", 7, max_tokens=10))
    s.add(_req("b", 7, max_tokens=10))
    _step(s)  # both prefilled: 2 blocks each, pool full
    assert s.kv.num_free_blocks == 0
    _step(s)  # position 7 still fits the 2nd block
    assert s.num_preemptions == 0
    _step(s)  # a needs a 3rd block for position 8 -> b (newest) is preempted
    assert s.num_preemptions == 1
    b = next(r for r in s.waiting)
    assert b.request_id == "b" and b.num_computed_tokens == 0 and b.status is RequestStatus.WAITING
    while s.has_work:
        _step(s)
    assert s.kv.num_free_blocks == 4


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "decoding"])
def test_abort_at_any_time_frees_everything(when):
    s = _sched(budget=8, blocks=16)
    s.add(_req("a", 20))
    if when != "waiting":
        _step(s)
    if when == "decoding":
        _step(s), _step(s), _step(s)
        assert s.requests["a"].output_token_ids
    s.finish(s.requests["a"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_work and s.kv.num_free_blocks == 16
    assert "a" in s.schedule().finished_request_ids


def test_max_num_seqs_caps_the_batch():
    s = _sched(budget=64, max_seqs=2)
    for r in "abc":
        s.add(_req(r, 3))
    assert len(s.schedule().sequences) == 2


def test_stop_conditions():
    s = _sched()

    def after(*outputs):
        r = Request(
            "a",
            [1, 2],
            SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=(9,)),
            eos_token_ids=(0,),
        )
        for t in outputs:
            r.append_output(t)
        return s.stop_status(r)

    assert after(0) is None  # EOS before min_tokens does not stop
    assert after(5, 0) is RequestStatus.FINISHED_STOPPED
    assert after(5, 9) is RequestStatus.FINISHED_STOPPED
    assert after(5, 6, 7, 8, 1) is RequestStatus.FINISHED_LENGTH
