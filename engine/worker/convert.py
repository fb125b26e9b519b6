"""Conversions between worker.proto messages and the engine's dataclasses (SamplingParams,
RequestOutput -> TokenChunk / Token). Transfer tickets convert in kv_transfer/wire.py,
the KV layout spec in engine/kv_cache/spec_pb.py."""

from __future__ import annotations

from engine.request import RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutput
from proto import worker_pb2 as pb


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in p.logit_bias],
        min_p=p.min_p,
    )
    if p.repetition_penalty != 1.0:
        msg.repetition_penalty = p.repetition_penalty
    if p.structured is not None:
        msg.structured.CopyFrom(pb.StructuredOutput(kind=p.structured.kind, spec=p.structured.spec))
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    if p.top_k is not None:
        msg.top_k = p.top_k
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ``ValueError`` for invalid values (the engine's own checks)."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        min_tokens=msg.min_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
        min_p=msg.min_p,
        structured=_structured(msg),
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )


def _structured(msg: pb.SamplingParams) -> StructuredOutput | None:
    if not msg.HasField("structured"):
        return None
    try:
        return StructuredOutput(msg.structured.kind, msg.structured.spec)
    except ValueError as exc:  # one message for every bad field of the params
        raise ValueError(f"invalid sampling params: {exc}") from None


def token_to_pb(token_id: int, logprobs: dict[int, float] | None, num_top: int | None) -> pb.Token:
    msg = pb.Token(token_id=token_id)
    if logprobs:
        if token_id in logprobs:
            msg.logprob = logprobs[token_id]
        top = sorted(logprobs.items(), key=lambda kv: -kv[1])[: num_top or 0]
        msg.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top)
    return msg


def token_logprobs(msg: pb.Token) -> dict[int, float] | None:
    """The engine's per-token logprob dict (chosen token + alternatives), or ``None``."""
    if not msg.HasField("logprob"):
        return None
    out = {t.token_id: t.logprob for t in msg.top_logprobs}
    out[msg.token_id] = msg.logprob
    return out


def prompt_logprobs_to_pb(
    prompt: list[int], logprobs: list[dict[int, float]] | None, num_top: int | None
) -> list[pb.Token]:
    """``RequestOutput.prompt_logprobs`` (tokens 1.. of ``prompt``) as proto tokens."""
    if logprobs is None:
        return []
    return [token_to_pb(t, lp, num_top) for t, lp in zip(prompt[1:], logprobs, strict=True)]


def chunk_from_output(
    out: RequestOutput,
    num_top: int | None,
    prompt: list[int] | None = None,
    prompt_top: int | None = None,
) -> pb.TokenChunk:
    """``prompt``: the request's prompt, to name the tokens of ``out.prompt_logprobs``."""
    logprobs = out.new_logprobs or [None] * len(out.new_token_ids)
    prompt_lps = (
        prompt_logprobs_to_pb(prompt or [], out.prompt_logprobs, prompt_top) if prompt else []
    )
    return pb.TokenChunk(
        tokens=[
            token_to_pb(t, lp, num_top) for t, lp in zip(out.new_token_ids, logprobs, strict=True)
        ],
        finished=out.finished,
        finish_reason=out.finish_reason or "",
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        num_output_tokens=out.num_output_tokens,
        prompt_logprobs=prompt_lps,
    )
