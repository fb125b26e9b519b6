"""The engine hooks disaggregated workers use: prefill-only with a per-layer KV hook on one
engine, reserve + admit-prefilled on another. Pages move in-process here; kv_transfer moves
them between processes."""

from __future__ import annotations

from engine import LLM, SamplingParams
from engine.engine import LLMEngine
from engine.kv_cache.layout import gather_blocks, scatter_blocks
from engine.kv_handoff import LayerKV, Reservation
from tests.engine.hf_reference import hf_greedy, make_prompts

MAX_NEW = 16
PARAMS = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


class PageCopier:
    """A KV layer hook that copies each layer's freshly written blocks into the decode engine."""

    def __init__(self, decode: LLMEngine) -> None:
        self.decode = decode
        self.tickets: dict[str, Reservation] = {}
        self.layers_seen: list[int] = []

    def __call__(self, layer: int, items: list[LayerKV], cache) -> None:
        self.layers_seen.append(layer)
        bs = self.decode.layout.block_size
        for item in items:
            ticket = self.tickets[item.request_id]
            idx = [
                i
                for i in range(item.start_pos // bs, (item.end_pos - 1) // bs + 1)
                if i >= ticket.num_cached_blocks
            ]
            for src_cache, dst_cache in zip(cache, self.decode.kv_caches[layer], strict=True):
                pages = gather_blocks(src_cache, [item.block_ids[i] for i in idx])
                scatter_blocks(dst_cache, [ticket.block_ids[i] for i in idx], pages)


def _disagg(
    prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]], params=PARAMS
) -> list[list[int]]:
    copier = PageCopier(decode)
    prefill.kv_layer_hook = copier
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        copier.tickets[rid] = decode.reserve(rid, prompt, params)
        prefill.add_request(rid, prompt, params, prefill_only=True)
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            assert out.finished and out.finish_reason == "prefilled"
            prefill.release(out.request_id)
            first = decode.admit_prefilled(out.request_id, out.new_token_ids[0])
            outputs[out.request_id] = list(first.new_token_ids)
    while decode.has_unfinished_requests():
        for out in decode.step():
            outputs[out.request_id] += out.new_token_ids
    assert prefill.num_free_blocks == prefill.layout.num_blocks
    assert decode.num_free_blocks == decode.layout.num_blocks
    return [outputs[f"r{i}"] for i in range(len(prompts))], copier


def test_prefill_on_one_engine_decode_on_another_equals_hf(tiny_model):
    d = tiny_model("llama")
    prompts = make_prompts([20, 45, 7], seed=11)
    prefill = LLM(d, max_num_batched_tokens=24).engine  # chunked: the hook runs over several steps
    decode = LLM(d).engine
    got, copier = _disagg(prefill, decode, prompts)
    assert got == hf_greedy(d, prompts, MAX_NEW)
    n = prefill.spec.num_layers
    assert copier.layers_seen[:n] == list(range(n))  # layer by layer, in order


def test_decode_side_prefix_hit_needs_fewer_pages(tiny_model):
    d = tiny_model("qwen3_moe")
    shared = make_prompts([40], seed=12)[0]
    prompts = [shared + [7, 8, 9], shared + [10, 11]]
    prefill, decode = LLM(d).engine, LLM(d).engine
    first, _ = _disagg(prefill, decode, prompts[:1])
    ticket = decode.reserve("probe", prompts[1], PARAMS)
    assert ticket.num_cached_blocks == 2 and len(ticket.blocks_to_fill) == 1
    decode.abort("probe")
    second, _ = _disagg(prefill, decode, prompts[1:])
    assert first + second == hf_greedy(d, prompts, MAX_NEW)


def test_abandoned_reservation_and_prefill_are_freed(tiny_model):
    d = tiny_model("llama")
    prefill, decode = LLM(d).engine, LLM(d).engine
    prompt = make_prompts([30], seed=13)[0]
    ticket = decode.reserve("x", prompt, PARAMS)
    assert len(ticket.block_ids) == 2
    assert decode.num_free_blocks == decode.layout.num_blocks - 2
    assert decode.abort("x")
    prefill.add_request("x", prompt, PARAMS, prefill_only=True)
    prefill.step()
    assert prefill.num_free_blocks < prefill.layout.num_blocks  # held for sending
    assert prefill.abort("x")
    assert decode.num_free_blocks == decode.layout.num_blocks
    assert prefill.num_free_blocks == prefill.layout.num_blocks


def test_prefill_side_prefix_hit_is_still_sent(tiny_model):
    d = tiny_model("llama")
    shared = make_prompts([40], seed=14)[0]
    prompts = [shared + [3, 4], shared + [5, 6, 7]]
    prefill = LLM(d).engine
    _disagg(prefill, LLM(d).engine, prompts[:1])  # prefill engine now caches the prefix
    fresh_decode = LLM(d).engine  # holds nothing: every page must arrive
    got, _ = _disagg(prefill, fresh_decode, prompts[1:])
    assert got == hf_greedy(d, prompts[1:], MAX_NEW)


def test_seeded_sampling_is_the_same_disaggregated_and_local(tiny_model):
    """The prefill engine draws the first token and the decode engine the rest; a seeded
    request samples exactly what one engine alone samples (draws are keyed by position)."""
    d = tiny_model("llama")
    prompts = make_prompts([20, 33], seed=12)
    seeded = SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=1234, ignore_eos=True)
    got, _ = _disagg(LLM(d).engine, LLM(d).engine, prompts, seeded)
    local = [o.token_ids for o in LLM(d).generate(prompts, seeded)]
    assert got == local
    assert local != hf_greedy(d, prompts, MAX_NEW)  # really sampled, not greedy
