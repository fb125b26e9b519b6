"""The disaggregation hooks with EP=2 (2 spawned gloo ranks, data-parallel attention).

Prefill EP=2: prefill-only requests homed on the follower push their KV (prefix-cache
hits included) to the leader layer by layer, so the leader's KV hook streams it. Decode
EP=2: transferred KV lands on the leader and goes only to the request's home rank; a
decode-side prefix hit on a follower needs only the missing pages. Greedy output equals
HF and no block leaks, on both sides.
"""

from __future__ import annotations

import json

from engine import LLM
from engine.engine import LLMEngine
from tests.engine.group_spawn import spawn_ep
from tests.engine.hf_reference import hf_greedy, make_prompts
from tests.engine.test_disagg_hooks import MAX_NEW, PARAMS, _disagg

ARGS = {"max_num_batched_tokens": 24}  # chunked: a prompt spans several steps


def _prompts() -> tuple[list[list[int]], list[list[int]]]:
    first = make_prompts([20, 45, 7], seed=11)
    shared = first[1][:32]  # cached where request 1 lives (rank 1 on both sides)
    return first, [shared + [3, 4], shared + [5, 6, 7]]


def _homes(engine: LLMEngine) -> list[tuple[str, int, int]]:
    """Record ``(request_id, home_rank, start_pos)`` of every scheduled sequence."""
    seen, schedule = [], engine.scheduler.schedule

    def recorded():
        so = schedule()
        seen.extend((s.request_id, engine.kv.home(s.request_id), s.start_pos) for s in so.sequences)
        return so

    engine.scheduler.schedule = recorded
    return seen


def _run(ep, model: str, out_path: str) -> None:
    first, second = _prompts()
    result = {}
    # Prefill EP=2, decode EP=1 (in the leader's process).
    prefill = LLM(model, ep=ep, **ARGS).engine
    if ep.is_leader:
        homes = _homes(prefill)
        a, _ = _disagg(prefill, LLM(model).engine, first)
        n = len(homes)
        b, _ = _disagg(prefill, LLM(model).engine, second)  # fresh decode: all pages sent
        prefill.stop_followers()
        result["prefill_ep"] = {"tokens": a + b, "homes": [homes[:n], homes[n:]]}
    else:
        prefill.run_follower()
    # Prefill EP=1 (in the leader's process), decode EP=2.
    decode = LLM(model, ep=ep).engine
    if ep.is_leader:
        prefill = LLM(model, **ARGS).engine
        a, _ = _disagg(prefill, decode, first)
        probe = decode.reserve("probe", second[0], PARAMS)
        ticket = [decode.kv.home("probe"), probe.num_cached_blocks, len(probe.blocks_to_fill)]
        decode.abort("probe")
        b, _ = _disagg(prefill, decode, second)
        decode.stop_followers()
        result["decode_ep"] = {"tokens": a + b, "probe": ticket}
        with open(out_path, "w") as f:
            json.dump(result, f)
    else:
        decode.run_follower()


def test_prefill_ep2_and_decode_ep2_equal_hf(tiny_model, tmp_path):
    model = str(tiny_model("mixtral"))
    out = tmp_path / "disagg.json"
    spawn_ep(_run, model, str(out))
    r = json.loads(out.read_text())
    first, second = _prompts()
    want = hf_greedy(model, first, MAX_NEW) + hf_greedy(model, second, MAX_NEW)
    assert r["prefill_ep"]["tokens"] == want
    assert r["decode_ep"]["tokens"] == want
    batch1, batch2 = r["prefill_ep"]["homes"]
    assert {h for _, h, _ in batch1} == {0, 1}
    # In the second batch, both requests start on rank 1 after a 32-token hit there,
    # and the hit's pages reached the (fresh) decode engine: the tokens equal HF.
    first_steps = {}
    for rid, h, start in batch2:
        first_steps.setdefault(rid, (h, start))
    assert first_steps == {"r0": (1, 32), "r1": (1, 32)}
    # Decode side: the prefix lives on rank 1, so the reservation is homed there and
    # needs only the last block (2 of 3 blocks of 16 tokens cached).
    assert r["decode_ep"]["probe"] == [1, 2, 1]
