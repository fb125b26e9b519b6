"""Turn a step's logits into tokens, batched over the step's rows.

Order of the processors, each applied to the whole batch at once (rows that do not use
one are left as they are)::

    raw logits ──> logprobs (log-softmax of the raw logits, as vLLM reports them)
      └─> suppress (EOS/stop ids before min_tokens) ─> logit_bias ─> repetition penalty
          ─> presence / frequency penalties ─> grammar mask
          ├─> greedy rows: argmax
          └─> sampled rows: / temperature ─> top-k ─> top-p ─> min_p ─> softmax ─> draw

The penalties follow Hugging Face ``RepetitionPenaltyLogitsProcessor`` (prompt and output
tokens: positive logits divided, negative multiplied) and the OpenAI definition of
presence / frequency (output tokens only: ``logit -= count * frequency + (count > 0) *
presence``), as vLLM applies them.

Every random draw is seeded on its own (``seeds[i]``, chosen by the runner from the
request's seed and the token's position), so a request's samples do not depend on which
engine draws them or what else is in the batch; that draw is the one per-row operation.

A row that cannot be sampled (logits with NaN or +inf, from a broken checkpoint or an
extreme value; no token left once suppression, bias and the grammar have masked;
probabilities that overflow at its temperature) becomes a :class:`SampleFailure`: that
request fails alone and every other row is sampled as if it were not there.
Probabilities are checked *before* ``torch.multinomial``, which on CUDA answers NaN with
a device-side assert that would end the whole process.
"""

from __future__ import annotations

import torch

from engine.grammar import unpack_bitmask
from engine.sampler_state import Controls
from engine.sampling_params import SamplingParams
from engine.scheduler_output import SampledToken, SampleFailure

NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this request; "
    "the checkpoint or the prompt drives it out of float range"
)
NOTHING_ALLOWED = (
    "no token is allowed at this step: the grammar, logit_bias and the tokens suppressed "
    "before min_tokens exclude every one (e.g. the grammar allows only end-of-sequence "
    "but min_tokens suppresses it)"
)
OVERFLOW = "logit_bias or a penalty drove a logit out of float32 range"


def apply_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask a 1-D row of logits outside its top-k / nucleus (top-p) set with ``-inf``."""
    v = logits.shape[-1]
    k = torch.tensor([top_k or v])
    return _top_k_top_p(logits.unsqueeze(0), k, torch.tensor([top_p]))[0]


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Batched top-k then top-p over rows (``k`` = vocab size and ``p`` = 1 keep all)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    pos = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(pos >= k.to(logits.device)[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= p.to(logits.device)[:, None]  # keep the token crossing p
    # The most likely token always stays: a top_p below float32's resolution (5e-324
    # rounds to 0.0) would otherwise drop every token and sample from NaN.
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _suppress(logits: torch.Tensor, suppress: list[tuple[int, ...]]) -> dict[int, str]:
    """Mask each row's suppressed ids; rows whose ids cannot be masked fail alone."""
    failed, rows, ids = {}, [], []
    vocab = logits.shape[-1]
    for i, row_ids in enumerate(suppress):
        bad = [t for t in row_ids if not 0 <= t < vocab]
        if bad:
            failed[i] = f"suppressed token id {bad[0]} is outside the vocabulary [0, {vocab})"
        else:
            rows += [i] * len(row_ids)
            ids += row_ids
    if ids:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)] = float("-inf")
    return failed


def _process(logits: torch.Tensor, ctl: Controls) -> None:
    """Bias, penalties and grammar masks, in place."""
    if ctl.bias is not None:
        rows, ids, vals = ctl.bias
        vocab = logits.shape[-1]
        ok = ids < vocab  # an id past the logits is refused at admission; never index it
        logits.index_put_((rows[ok], ids[ok]), vals[ok], accumulate=True)
    if ctl.penalty_rows is not None:
        rows = ctl.penalty_rows
        x = logits[rows]
        rep = ctl.repetition[:, None]
        x = torch.where(ctl.seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - ctl.counts * ctl.frequency[:, None] - (ctl.counts > 0) * ctl.presence[:, None]
        logits[rows] = x
    if ctl.grammar_rows:
        allowed = unpack_bitmask(ctl.masks.result(), logits.shape[-1], logits.device)
        rows = torch.tensor(ctl.grammar_rows, device=logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    suppress: list[tuple[int, ...]],
    generator: torch.Generator,
    controls: Controls | None = None,
) -> list[SampledToken | SampleFailure]:
    """One token per row of ``logits`` (fp32 ``[S, V]``), or the reason that row failed;
    a sampled row reseeds ``generator`` with ``seeds[i]`` right before its draw."""
    ctl = controls or Controls()
    # NaN and +inf survive a row max, and so does a row left with no finite logit.
    finite = torch.isfinite(logits.amax(dim=-1))
    want_logprobs = [p.logprobs for p in params]
    logprobs = _logprobs(logits, want_logprobs)
    failed = dict(ctl.failed or {})
    failed.update(_suppress(logits, suppress))
    _process(logits, ctl)
    best = logits.amax(dim=-1)
    greedy_ids = torch.argmax(logits, dim=-1)
    drawn = _draw(logits, params, seeds, generator, failed)
    finite, best, greedy_ids = finite.tolist(), best.tolist(), greedy_ids.tolist()
    out: list[SampledToken | SampleFailure] = []
    for i, p in enumerate(params):
        why = failed.get(i) or _row_error(finite[i], best[i])
        token = greedy_ids[i] if p.greedy else drawn.get(i)
        if why is None and isinstance(token, SampleFailure):
            why = token.reason
        if why is not None:
            out.append(SampleFailure(why))
            continue
        out.append(SampledToken(token, logprobs(i, token) if want_logprobs[i] is not None else None))  # fmt: skip
    return out


def _row_error(raw_finite: bool, best: float) -> str | None:
    if not raw_finite:
        return NON_FINITE
    if best == float("-inf"):
        return NOTHING_ALLOWED
    if best != best or best == float("inf"):
        return OVERFLOW
    return None


def _logprobs(logits: torch.Tensor, want: list[int | None]):
    """``lookup(row, token) -> {token: logprob, top alternatives...}`` over the raw logits."""
    rows = [i for i, n in enumerate(want) if n is not None]
    if not rows:
        return lambda i, t: None
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[idx], dim=-1)
    k = max(want[i] for i in rows)
    top_v, top_i = torch.topk(lp, k) if k else (lp[:, :0], lp[:, :0].long())
    lp_cpu, top_v, top_i = lp.cpu(), top_v.tolist(), top_i.tolist()
    where = {r: j for j, r in enumerate(rows)}

    def lookup(i: int, token: int) -> dict[int, float]:
        j, n = where[i], want[i]
        out = {token: float(lp_cpu[j, token])}
        for v, t in zip(top_v[j][:n], top_i[j][:n], strict=True):
            out.setdefault(t, v)
        return out

    return lookup


def _draw(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    generator: torch.Generator,
    failed: dict[int, str],
) -> dict[int, int | SampleFailure]:
    """Seeded draws for the non-greedy rows, their filtering batched."""
    rows = [i for i, p in enumerate(params) if not p.greedy and i not in failed]
    if not rows:
        return {}
    sub = [params[i] for i in rows]
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    temp = torch.tensor([p.temperature for p in sub], device=dev)
    x = logits[idx] / temp[:, None]
    vocab = x.shape[-1]
    if any(p.top_k is not None and p.top_k < vocab or p.top_p < 1.0 for p in sub):
        k = torch.tensor([min(p.top_k or vocab, vocab) for p in sub])
        x = _top_k_top_p(x, k, torch.tensor([p.top_p for p in sub]))
    if any(p.min_p > 0 for p in sub):
        probs = torch.softmax(x, dim=-1)
        min_p = torch.tensor([p.min_p for p in sub], device=dev)
        x = x.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p[:, None], float("-inf"))
    probs = torch.softmax(x, dim=-1)
    ok = torch.isfinite(probs).all(dim=-1).tolist()
    out: dict[int, int | SampleFailure] = {}
    for j, i in enumerate(rows):
        if not ok[j]:
            out[i] = SampleFailure(
                f"sampling probabilities are not finite at temperature={sub[j].temperature}: "
                "the logits overflow float32 when scaled; raise the temperature or use 0 (greedy)"
            )
            continue
        out[i] = int(torch.multinomial(probs[j], 1, generator=generator.manual_seed(seeds[i])))
    return out
