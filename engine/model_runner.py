"""Runs one step: SchedulerOutput -> input tensors + attention metadata -> model -> tokens.

    execute(step) = forward (final hidden rows of the sampling sequences)
                    -> compute_logits -> sample
    follow(step)  = the same forward and logits, no sampling: a follower rank of a
                    parallel replica, whose layers' collectives must match the leader's

A parallel replica drives these pieces from engine/parallel/ (driver.py, ep_driver.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.grammar import GrammarBackend
from engine.kv_cache.layout import slot_mapping
from engine.models.llama import CausalLM
from engine.prompt_logprobs import score_prompts
from engine.sampler import sample
from engine.sampler_state import SamplerStates
from engine.scheduler_output import ScheduledSequence, SchedulerOutput, StepResult

LayerHook = Callable[[int], None]


def build_metadata(so: SchedulerOutput, block_size: int, device: torch.device) -> AttentionMetadata:
    """Attention metadata for one step (sequences already ordered decodes first)."""
    seqs = so.sequences
    qlens = [s.num_tokens for s in seqs]
    seq_lens = [s.start_pos + s.num_tokens for s in seqs]
    ctx_lens = [s.start_pos for s in seqs]
    max_blocks = max(len(s.block_ids) for s in seqs)
    tables = [list(s.block_ids) + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
    slots = [
        slot
        for s in seqs
        for slot in slot_mapping(s.block_ids, s.start_pos, s.start_pos + s.num_tokens, block_size)
    ]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return AttentionMetadata(
        query_start_loc=as_i32(qsl),
        seq_lens=as_i32(seq_lens),
        context_lens=as_i32(ctx_lens),
        block_tables=as_i32(tables),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_decodes=so.num_decodes,
        max_query_len=max(qlens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        seq_lens_cpu=tuple(seq_lens),
        context_lens_cpu=tuple(ctx_lens),
    )


class ModelRunner:
    """Owns the model, the KV cache tensors and per-request sampler state."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        seed: int = 0,
        vocab_size: int | None = None,
        grammars: GrammarBackend | None = None,
    ) -> None:
        """``vocab_size`` (logits width) and ``grammars`` serve the sampler's per-request
        state: penalties and structured output."""
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.seed = seed
        self._generator = torch.Generator(device="cpu" if device.type == "cpu" else device)
        self.sampler_states = SamplerStates(vocab_size or 0, device, grammars)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, after_layer: LayerHook | None = None) -> StepResult:
        """Run the step: a token for every sequence with ``sample=True``, and the prompt
        logprobs the step's sequences asked for."""
        self.sampler_states.drop(so.finished_request_ids)
        if so.is_empty:
            return StepResult({})
        sampling = [s for s in so.sequences if s.sample]
        controls = self.begin(sampling)
        rows, prompt_lps = self.forward(so, after_layer)
        return self.sample(sampling, rows, controls, prompt_lps)

    def begin(self, sampling: list[ScheduledSequence]):
        """Leader, before the forward: grammar masks for ``sampling`` are filled on a
        helper thread while the model runs (None: nothing to fill)."""
        return self.sampler_states.begin(sampling) if sampling else None

    @torch.inference_mode()
    def follow(self, so: SchedulerOutput, after_layer: LayerHook | None = None) -> None:
        """Run the step's forward and logits without sampling (a follower rank: the
        collectives of the vocabulary-parallel LM head match the leader's)."""
        if so.is_empty:
            return
        rows, _ = self.forward(so, after_layer)
        if rows.shape[0]:
            self.model.compute_logits(rows)

    @torch.inference_mode()
    def sample(
        self, sampling: list[ScheduledSequence], rows: torch.Tensor, controls=None, prompt_lps=None
    ) -> StepResult:
        """Tokens for ``sampling`` from their final hidden ``rows`` (same order)."""
        prompt_lps = prompt_lps or {}
        if not sampling:
            return StepResult({}, prompt_lps)
        tokens = sample(
            self.model.compute_logits(rows),
            [s.sampling_params for s in sampling],
            [self._row_seed(s) for s in sampling],
            [s.suppress_token_ids for s in sampling],
            self._generator,
            controls,
        )
        tokens = self.sampler_states.commit(sampling, tokens)
        return StepResult({s.request_id: t for s, t in zip(sampling, tokens, strict=True)}, prompt_lps)  # fmt: skip

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput, after_layer: LayerHook | None):
        """Final hidden rows ``[num_sampling, hidden]`` of the sequences that sample, and
        the prompt logprobs of the sequences that ask for them (every rank scores: the
        LM head's collectives run on all of them)."""
        input_ids = torch.tensor(
            [t for s in so.sequences for t in s.token_ids], dtype=torch.int64, device=self.device
        )
        positions = torch.tensor(
            [p for s in so.sequences for p in range(s.start_pos, s.start_pos + s.num_tokens)],
            dtype=torch.int64,
            device=self.device,
        )
        meta = build_metadata(so, self.block_size, self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend, after_layer)
        last = meta.query_start_loc[1:].long() - 1
        rows = torch.tensor([i for i, s in enumerate(so.sequences) if s.sample], dtype=torch.int64)
        prompt_lps = {}
        if any(s.prompt_logprobs is not None for s in so.sequences):
            starts = meta.query_start_loc.tolist()
            prompt_lps = score_prompts(hidden, starts, so.sequences, self.model.compute_logits)
        return hidden[last[rows.to(self.device)]], prompt_lps

    def _row_seed(self, s: ScheduledSequence) -> int:
        """The seed of the draw for the token at position ``start_pos + num_tokens``.

        Keyed by (request seed, position) rather than a per-request generator's state, so a
        seeded request samples the same tokens wherever each one is drawn: a prefill worker
        draws the first token and a decode worker the rest, or one engine draws them all
        (also across preemption and recompute)."""
        seed = s.sampling_params.seed
        if seed is None:
            seed = _default_seed(self.seed, s.request_id)
        return _mix64(seed, s.start_pos + s.num_tokens)


def _default_seed(engine_seed: int, request_id: str) -> int:
    """A stable seed for requests that give none (differs per request, not per run)."""
    return (engine_seed << 32) ^ zlib.crc32(request_id.encode())


_MASK64 = (1 << 64) - 1


def _mix64(seed: int, position: int) -> int:
    """SplitMix64 of ``(seed, position)``: well-spread 64-bit seeds for nearby inputs."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
