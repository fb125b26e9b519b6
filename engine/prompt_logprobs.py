"""Log-probabilities of prompt tokens (``echo`` with ``logprobs``, vLLM ``prompt_logprobs``).

A chunk of prompt positions ``[start, start + n)`` predicts the prompt tokens after each
position: row ``j`` of the chunk predicts token ``start + j + 1``. The scheduler names
those targets (``ScheduledSequence.prompt_targets``: the tokens at ``start + 1 ...``, up
to the last prompt token), so the chunk's first ``len(targets)`` rows are scored::

    prompt:    t0   t1   t2   t3   t4          chunk = positions 2..4 (t2 t3 t4)
    targets:             t3   t4               rows 0, 1 of the chunk predict them;
                                               row 2 (t4) predicts the first output token
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.scheduler_output import ScheduledSequence

ROWS_PER_PASS = 256
"""Rows scored per LM-head pass: bounds the ``[rows, vocab]`` float32 buffer."""


def score_prompts(
    hidden: torch.Tensor,
    starts: list[int],
    seqs: tuple[ScheduledSequence, ...],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, list[dict[int, float]]]:
    """Per sequence asking for them, ``{target: logprob, top alternatives...}`` per target
    (``starts[i]``: row of sequence ``i``'s first token in ``hidden``)."""
    out = {}
    for i, s in enumerate(seqs):
        if s.prompt_logprobs is None or not s.prompt_targets:
            continue
        rows = hidden[starts[i] : starts[i] + len(s.prompt_targets)]
        out[s.request_id] = _score(rows, s.prompt_targets, s.prompt_logprobs, compute_logits)
    return out


def _score(rows, targets, top_n: int, compute_logits) -> list[dict[int, float]]:
    out = []
    for a in range(0, len(targets), ROWS_PER_PASS):
        part = targets[a : a + ROWS_PER_PASS]
        lp = torch.log_softmax(compute_logits(rows[a : a + len(part)]).float(), dim=-1)
        ids = torch.tensor(part, device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        tops_v, tops_i = torch.topk(lp, top_n) if top_n else (lp[:, :0], lp[:, :0].long())
        for t, c, vs, ts in zip(part, chosen, tops_v.tolist(), tops_i.tolist(), strict=True):
            entry = {t: c}
            for v, alt in zip(vs, ts, strict=True):
                entry.setdefault(alt, v)
            out.append(entry)
    return out
