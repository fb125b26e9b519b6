"""Turn a step's logits into tokens: greedy, temperature, top-k, top-p.

Every random draw is seeded on its own (``seeds[i]``, chosen by the runner from the
request's seed and the token's position), so a request's samples do not depend on which
engine draws them or what else is in the batch.

A row that cannot be sampled (logits with NaN or +inf, from a broken checkpoint or an
extreme value; no finite logit left; probabilities that overflow at its temperature)
becomes a :class:`SampleFailure`: that request fails alone and every other row is sampled
as if it were not there. Probabilities are checked *before* ``torch.multinomial``, which
on CUDA answers NaN with a device-side assert that would end the whole process.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams
from engine.scheduler_output import SampledToken, SampleFailure

NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this request; "
    "the checkpoint or the prompt drives it out of float range"
)


def apply_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask a 1-D row of logits outside its top-k / nucleus (top-p) set with ``-inf``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing p
        # The most likely token always stays: a top_p below float32's resolution (5e-324
        # rounds to 0.0) would otherwise drop every token and sample from NaN.
        drop[0] = False
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


def _suppress(logits: torch.Tensor, suppress: list[tuple[int, ...]]) -> dict[int, str]:
    """Mask each row's suppressed ids; rows whose ids cannot be masked fail alone."""
    failed = {}
    vocab = logits.shape[-1]
    for i, ids in enumerate(suppress):
        if not ids:
            continue
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            failed[i] = f"suppressed token id {bad[0]} is outside the vocabulary [0, {vocab})"
        else:
            logits[i, list(ids)] = float("-inf")
    return failed


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    suppress: list[tuple[int, ...]],
    generator: torch.Generator,
) -> list[SampledToken | SampleFailure]:
    """One token per row of ``logits`` (fp32 ``[S, V]``), or the reason that row failed;
    a sampled row reseeds ``generator`` with ``seeds[i]`` right before its draw."""
    failed = _suppress(logits, suppress)
    # NaN and +inf survive a row max, and so does a row left with no finite logit.
    finite = torch.isfinite(logits.amax(dim=-1)).tolist()
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    out: list[SampledToken | SampleFailure] = []
    for i, p in enumerate(params):
        if i in failed or not finite[i]:
            out.append(SampleFailure(failed.get(i, NON_FINITE)))
            continue
        if p.greedy:
            token = greedy_ids[i]
        else:
            token = _sample_row(logits[i], p, generator.manual_seed(seeds[i]))
            if isinstance(token, SampleFailure):
                out.append(token)
                continue
        lp = _top_logprobs(logprobs[i], token, p.logprobs) if p.logprobs is not None else None
        out.append(SampledToken(token, lp))
    return out


def _sample_row(
    row: torch.Tensor, p: SamplingParams, generator: torch.Generator
) -> int | SampleFailure:
    row = apply_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
    probs = torch.softmax(row, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return SampleFailure(
            f"sampling probabilities are not finite at temperature={p.temperature}: "
            "the logits overflow float32 when scaled; raise the temperature or use 0 (greedy)"
        )
    return int(torch.multinomial(probs, 1, generator=generator))
