"""Expert parallelism on CPU (gloo, 2 spawned ranks).

Dispatch/combine equals the single-process expert computation under uneven routing (an
expert with no tokens, a rank that receives none, a rank that sends none, top-3 in bf16)
and sends a token once to each rank owning its experts; the leader
gathers only the sampling rows; greedy output with EP=2 (data-parallel attention) equals
EP=1 equals HF for the tiny MoE models over a workload with both ranks busy, steps where
one rank has no sequences, chunked prefill, a prefix hit and preemption.
"""

from __future__ import annotations

import json

import torch

from engine import LLM, SamplingParams
from engine.layers.moe import expert_forward
from engine.parallel.ep import combine, dispatch, ep_expert_forward, gather_to_leader
from tests.engine.group_spawn import on_leader, save_on_leader, spawn_ep
from tests.engine.hf_reference import hf_greedy, make_prompts

E, H, INTER = 4, 8, 6
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

# name -> per rank: expert ids [N, 2] (rank r's tokens)
ROUTINGS = {
    "uneven, expert 3 idle": [[[0, 1], [2, 0], [1, 2], [0, 2], [2, 1]], [[1, 0], [2, 1], [0, 2]]],
    "rank 1 receives none": [[[0, 1], [1, 0], [0, 1]], [[1, 0], [0, 1]]],
    "rank 1 sends none": [[[3, 0], [2, 1], [1, 3]], []],
    "all to one expert pair": [[[2, 3]], [[3, 2], [2, 3], [3, 2]]],
}


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * INTER, H, generator=g), torch.randn(E, H, INTER, generator=g)


def _local_runner(ep, w13, w2):
    start, end = ep.expert_range(E)

    def run(rows, ids, weights):
        return expert_forward(rows, weights, ids, w13[start:end], w2[start:end], start)

    return run


def _dispatch_rank(ep, out_path):
    w13, w2 = _weights()
    run = _local_runner(ep, w13, w2)
    errors = {}
    for name, per_rank in ROUTINGS.items():
        ids = torch.tensor(per_rank[ep.rank], dtype=torch.int64).reshape(-1, 2)
        g = torch.Generator().manual_seed(ep.rank + 1)
        x = torch.randn(ids.shape[0], H, generator=g)
        w = torch.rand(ids.shape[0], 2, generator=g)
        got = ep_expert_forward(x, w, ids, E, ep, run)
        want = expert_forward(x, w, ids, w13, w2)
        errors[name] = (got - want).abs().max().item() if ids.numel() else 0.0
    errors.update(_dedup_errors(ep, run, w13, w2))
    for counts in ([2, 3], [0, 2], [1, 0], [0, 0]):  # rank r sends counts[r] rows
        rows = torch.full((counts[ep.rank], H), float(ep.rank + 1))
        got = gather_to_leader(rows, counts, ep)
        want = torch.cat([torch.full((n, H), float(r + 1)) for r, n in enumerate(counts)])
        want = want if ep.is_leader else want[:0]
        errors[f"gather {counts}"] = 0.0 if torch.equal(got, want) else 1.0
    with open(f"{out_path}.{ep.rank}", "w") as f:
        json.dump(errors, f)


def _dedup_errors(ep, run, w13, w2) -> dict[str, float]:
    """A token whose experts share an owner travels there once (rank 0 owns experts 0-1,
    rank 1 experts 2-3); top-3 in bf16 carries the ids in int16 bits beside the row."""
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(7 + ep.rank))
    d = dispatch(x, torch.rand(4, 2), ids, E, ep)
    combine(d.x.contiguous(), d)
    errors = {"rows sent per owner": float(d.send_splits != [3, 3])}
    ids3 = torch.tensor([[0, 1, 2], [3, 2, 0], [1, 0, 3], [2, 3, 1]])[ep.rank :]
    g = torch.Generator().manual_seed(11 + ep.rank)
    x3 = torch.randn(ids3.shape[0], H, generator=g).bfloat16()
    w3 = torch.rand(ids3.shape[0], 3, generator=g).bfloat16()
    run16 = _local_runner(ep, w13.bfloat16(), w2.bfloat16())
    got = ep_expert_forward(x3, w3, ids3, E, ep, run16).float()
    want = expert_forward(x3, w3, ids3, w13.bfloat16(), w2.bfloat16()).float()
    relative = ((got - want).abs().max() / want.abs().max()).item()
    errors["top-3 bf16 off by more than 3% of the largest output"] = float(relative > 0.03)
    return errors


def test_dispatch_combine_uneven_routing(tmp_path):
    out = tmp_path / "errors"
    spawn_ep(_dispatch_rank, str(out))
    for rank in range(2):
        errors = json.loads((tmp_path / f"errors.{rank}").read_text())
        assert set(errors) >= set(ROUTINGS)
        assert all(e < 1e-5 for e in errors.values()), (rank, errors)


# Both ranks busy, a prefix hit (the last prompt shares 16 tokens with the second),
# chunked prefill (16-token budget) and preemption (30 blocks of 4 tokens).
ENGINE_ARGS = {"max_num_batched_tokens": 16, "block_size": 4, "num_kv_blocks": 30}


def _workload() -> list[list[int]]:
    base = make_prompts([5, 21, 9, 30, 13, 3], seed=11)
    return [*base, base[1][:17] + [7, 8, 9]]


def _record_steps(engine) -> list[list[tuple[int, int]]]:
    """Per step, ``(home_rank, num_tokens)`` of every scheduled sequence."""
    steps, schedule = [], engine.scheduler.schedule

    def recorded():
        so = schedule()
        steps.append([(engine.kv.home(s.request_id), s.num_tokens) for s in so.sequences])
        return so

    engine.scheduler.schedule = recorded
    return steps


def _generate_rank(ep, model_dirs, prompts, out_path):
    results = {}
    for arch, d in model_dirs.items():
        llm = LLM(d, ep=ep, **ENGINE_ARGS)
        done = on_leader(llm, lambda llm: _recorded_generate(llm, prompts))
        if done is None:
            continue
        steps, outs = done
        load = llm.engine.expert_load()
        results[arch] = {
            "tokens": [o.token_ids for o in outs],
            "cached": [o.num_cached_tokens for o in outs],
            "free": llm.engine.num_free_blocks,
            "total": llm.engine.layout.num_blocks,
            "preemptions": llm.engine.scheduler.num_preemptions,
            "steps": steps,
            "per_expert": list(load.tokens_per_expert),
            "per_rank": list(load.tokens_per_rank),
        }
    save_on_leader(ep, out_path, results)


def _recorded_generate(llm: LLM, prompts) -> tuple[list, list]:
    """The scheduled steps (``_record_steps``) and the outputs of one ``generate``."""
    steps = _record_steps(llm.engine)
    return steps, llm.generate(prompts, GREEDY)


def test_ep2_equals_ep1_equals_hf(tiny_model, tmp_path):
    dirs = {arch: str(tiny_model(arch)) for arch in MOE_ARCHS}
    prompts = _workload()
    out = tmp_path / "ep2.json"
    spawn_ep(_generate_rank, dirs, prompts, str(out))
    ep2 = json.loads(out.read_text())
    for arch, d in dirs.items():
        llm = LLM(d, **ENGINE_ARGS)
        ep1 = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        r = ep2[arch]
        assert r["tokens"] == ep1 == hf_greedy(d, prompts, MAX_NEW), arch
        assert r["free"] == r["total"] == llm.engine.num_free_blocks
        assert r["preemptions"] > 0 and r["cached"][-1] > 0, r
        homes = [{h for h, _ in step} for step in r["steps"] if step]
        assert {0, 1} in homes, "no step ran sequences on both ranks"
        assert {0} in homes or {1} in homes, "no step left a rank without sequences"
        assert any(n > 1 for step in r["steps"] for h, n in step if h == 1), "no prefill on 1"
        # Every (token, expert) assignment of every rank reaches the leader's counters.
        spec = llm.engine.spec.moe
        computed = sum(n for step in r["steps"] for _, n in step)
        assert sum(r["per_expert"]) == computed * spec.top_k * len(spec.sparse_layers)
        half = len(r["per_expert"]) // 2
        assert r["per_rank"] == [sum(r["per_expert"][:half]), sum(r["per_expert"][half:])]


def test_expert_load_counts_every_routed_token(tiny_model):
    llm = LLM(tiny_model("mixtral"))
    assert llm.engine.expert_load().tokens_per_expert == (0, 0, 0, 0)
    prompts = make_prompts([7, 5], seed=12)
    llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    load = llm.engine.expert_load()
    spec = llm.engine.spec.moe
    tokens = 12 + 2 * 2  # prompts, then 2 decode steps per request (3rd token not fed back)
    assert sum(load.tokens_per_expert) == tokens * spec.top_k * len(spec.sparse_layers)
    assert load.tokens_per_rank == (sum(load.tokens_per_expert),)
    assert 0 < load.expert_balancedness <= 1 and load.rank_balancedness == 1.0
    assert LLM(tiny_model("llama")).engine.expert_load() is None
