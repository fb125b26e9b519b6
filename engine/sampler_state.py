"""What the sampler remembers per request, and the per-step tensors built from it.

Owned by the model runner (the engine thread). A request that needs state
(``SamplingParams.needs_state``: penalties or a grammar) gets it the first time it samples,
from the ``SamplerInit`` its ``ScheduledSequence`` carries (the prompt, for the repetition
penalty, and the tokens generated before: by a prefill worker, or before this engine
admitted it), and keeps it, across preemption, until its id is in a step's
``finished_request_ids``::

    penalties   one row per request of two device buffers [slots, V]: output token counts
                (presence / frequency) and prompt-or-output occurrence (repetition);
                gathered for the step's rows with one index, updated with one index_put
    grammar     an llguidance matcher per request: every step's masks are filled in one
                batched call on a helper thread while the model runs (engine/grammar.py),
                and each sampled token is consumed into its matcher
    logit bias  no per-request state: (ids, values) tensors cached per distinct bias
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.grammar import GrammarBackend, fill_masks
from engine.scheduler_output import SampledToken, SampleFailure, ScheduledSequence

logger = logging.getLogger(__name__)

Result = SampledToken | SampleFailure


@dataclass
class Controls:
    """One step's logit processors for the rows being sampled (row = index in the step's
    sampling order); ``None``/empty where no row needs one."""

    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(rows, token ids, values), added with ``index_put_(accumulate=True)``."""
    penalty_rows: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    """int32 ``[P, V]`` output token counts of the penalty rows."""
    seen: torch.Tensor | None = None
    """bool ``[P, V]``: the token is in the prompt or the output (repetition penalty)."""
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    grammar_rows: tuple[int, ...] = ()
    masks: Future | None = None
    """int32 bitmask ``[len(grammar_rows), ceil(V / 32)]`` being filled."""
    failed: dict[int, str] | None = None
    """Rows whose state could not be set up: they fail alone."""


class _PenaltyRows:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.slots: dict[str, int] = {}
        self._free: list[int] = []

    def add(self, rid: str, prompt: tuple[int, ...], output: tuple[int, ...]) -> None:
        if not self._free:
            self._grow()
        slot = self.slots[rid] = self._free.pop()
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        for ids in (prompt, output):
            if ids:
                self.seen[slot, torch.tensor(ids, device=self.device)] = True
        if output:
            ids = torch.tensor(output, device=self.device)
            self.counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def _grow(self) -> None:
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        pad = (new - old, self.vocab)
        self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])
        self.seen = torch.cat([self.seen, self.seen.new_zeros(pad)])
        self._free.extend(range(new - 1, old - 1, -1))

    def drop(self, rid: str) -> None:
        slot = self.slots.pop(rid, None)
        if slot is not None:
            self._free.append(slot)

    def update(self, slots: list[int], tokens: list[int]) -> None:
        s = torch.tensor(slots, device=self.device)
        t = torch.tensor(tokens, device=self.device)
        self.counts.index_put_((s, t), torch.ones_like(t, dtype=torch.int32), accumulate=True)
        self.seen[s, t] = True


class SamplerStates:
    def __init__(
        self, vocab_size: int, device: torch.device, grammars: GrammarBackend | None = None
    ) -> None:
        self.vocab_size, self.device, self.grammars = vocab_size, device, grammars
        self._penalties = _PenaltyRows(vocab_size, device)
        self._matchers: dict[str, object] = {}
        self._bias: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def drop(self, request_ids) -> None:
        for rid in request_ids:
            self._penalties.drop(rid)
            self._matchers.pop(rid, None)

    def __len__(self) -> int:
        return len(self._penalties.slots) + len(self._matchers)

    def begin(self, seqs: list[ScheduledSequence]) -> Controls:
        """Set up new requests' state and this step's controls; starts the grammar masks."""
        ctl = Controls(failed={})
        for i, s in enumerate(seqs):
            if s.sampler_init is not None:
                self._init(i, s, ctl.failed)
        self._grammar(seqs, ctl)
        self._penalty_controls(seqs, ctl)
        self._bias_controls(seqs, ctl)
        return ctl

    def _init(self, row: int, s: ScheduledSequence, failed: dict[int, str]) -> None:
        p, init = s.sampling_params, s.sampler_init
        self.drop([s.request_id])
        if p.has_penalties:
            self._penalties.add(s.request_id, init.prompt, init.output)
        if p.structured is not None:
            try:
                matcher = self.grammars.matcher(p.structured)
            except Exception as exc:  # a grammar that compiled at admission cannot fail here
                failed[row] = f"structured output unavailable: {exc}"
                return
            if init.output and not matcher.consume_tokens(list(init.output)):
                failed[row] = (
                    "the tokens generated before this worker took over do not fit the "
                    f"grammar: {matcher.get_error()}"
                )
                return
            self._matchers[s.request_id] = matcher

    def _grammar(self, seqs: list[ScheduledSequence], ctl: Controls) -> None:
        rows, matchers = [], []
        for i, s in enumerate(seqs):
            if s.sampling_params.structured is None or i in ctl.failed:
                continue
            m = self._matchers.get(s.request_id)
            if m is None:
                ctl.failed[i] = "the grammar state of this request is missing"
                continue
            rows.append(i)
            matchers.append(m)
        if rows:
            ctl.grammar_rows = tuple(rows)
            ctl.masks = self._mask_thread.submit(fill_masks, self.grammars, matchers)

    def _penalty_controls(self, seqs: list[ScheduledSequence], ctl: Controls) -> None:
        rows = [i for i, s in enumerate(seqs) if s.request_id in self._penalties.slots]
        if not rows:
            return
        pen, dev = self._penalties, self.device
        slots = torch.tensor([pen.slots[seqs[i].request_id] for i in rows], device=dev)
        params = [seqs[i].sampling_params for i in rows]
        ctl.penalty_rows = torch.tensor(rows, device=dev)
        ctl.counts, ctl.seen = pen.counts[slots], pen.seen[slots]
        as_f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
        ctl.presence = as_f32([p.presence_penalty for p in params])
        ctl.frequency = as_f32([p.frequency_penalty for p in params])
        ctl.repetition = as_f32([p.repetition_penalty for p in params])

    def _bias_controls(self, seqs: list[ScheduledSequence], ctl: Controls) -> None:
        parts = []
        for i, s in enumerate(seqs):
            bias = s.sampling_params.logit_bias
            if bias:
                ids, vals = self._bias_tensors(bias)
                parts.append((torch.full_like(ids, i), ids, vals))
        if parts:
            ctl.bias = tuple(torch.cat(x) for x in zip(*parts, strict=True))

    def _bias_tensors(self, bias: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._bias.get(bias)
        if hit is None:
            if len(self._bias) > 1024:
                self._bias.clear()
            ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=self.device)
            vals = torch.tensor([b for _, b in bias], dtype=torch.float32, device=self.device)
            hit = self._bias[bias] = (ids, vals)
        return hit

    def commit(self, seqs: list[ScheduledSequence], results: list[Result]) -> list[Result]:
        """Advance every row's state by its sampled token; a token its grammar refuses
        (which the mask should make impossible) fails that row."""
        slots, tokens = [], []
        out = list(results)
        for i, (s, r) in enumerate(zip(seqs, results, strict=True)):
            if not isinstance(r, SampledToken):
                continue
            slot = self._penalties.slots.get(s.request_id)
            if slot is not None:
                slots.append(slot)
                tokens.append(r.token_id)
            m = self._matchers.get(s.request_id)
            if m is not None and not m.consume_token(r.token_id):
                out[i] = SampleFailure(f"token {r.token_id} breaks the grammar: {m.get_error()}")
        if slots:
            self._penalties.update(slots, tokens)
        return out
