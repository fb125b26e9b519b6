"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p.

Every random draw is seeded on its own (``seeds[i]``, chosen by the runner from the
request's seed and the token's position), so a request's samples do not depend on which
engine draws them or what else is in the batch."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams
from engine.scheduler_output import SampledToken


def apply_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask a 1-D row of logits outside its top-k / nucleus (top-p) set with ``-inf``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _top_logprobs(logprobs: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    out = {chosen: float(logprobs[chosen])}
    if n:
        values, ids = torch.topk(logprobs, n)
        for v, i in zip(values.tolist(), ids.tolist(), strict=True):
            out.setdefault(i, v)
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    suppress: list[tuple[int, ...]],
    generator: torch.Generator,
) -> list[SampledToken]:
    """One token per row of ``logits`` (fp32 ``[S, V]``); a sampled row reseeds
    ``generator`` with ``seeds[i]`` right before its draw."""
    for i, ids in enumerate(suppress):
        if ids:
            logits[i, list(ids)] = float("-inf")
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            token = greedy_ids[i]
        else:
            token = _sample_row(logits[i], p, generator.manual_seed(seeds[i]))
        lp = _top_logprobs(logprobs[i], token, p.logprobs) if p.logprobs is not None else None
        out.append(SampledToken(token, lp))
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    row = apply_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
