"""Checks a request must pass before it touches an engine: what ``SamplingParams`` cannot
know on its own (the model's vocabulary, its context length, the KV pool's size).

Every refusal is a ``ValueError`` naming the field, the value, the limit and the fix; the
workers answer it as INVALID_ARGUMENT and the router as HTTP 400. Without these checks a
stop token id past the vocabulary raises inside the batched sampler (masking it before
``min_tokens``), which is the engine's thread, not the request's.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Token ids and ``top_k`` within the model's vocabulary."""
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ValueError(
            f"stop_token_ids contains {bad[0]}, outside the vocabulary [0, {vocab_size}); "
            f"pass ids below {vocab_size}"
        )
    bias = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bias:
        raise ValueError(
            f"logit_bias names token id {bias[0]}, outside the vocabulary [0, {vocab_size}); "
            f"pass ids below {vocab_size}"
        )
    if params.top_k is not None and params.top_k > vocab_size:
        raise ValueError(
            f"top_k={params.top_k} exceeds the vocabulary size {vocab_size}; "
            f"pass top_k <= {vocab_size}, or omit it to keep every token"
        )


def check_prompt(prompt: list[int], vocab_size: int, max_model_len: int) -> None:
    """A non-empty prompt of in-vocabulary ids that leaves room for one generated token."""
    if not prompt:
        raise ValueError("prompt is empty; pass at least one token")
    if len(prompt) >= max_model_len:
        raise ValueError(
            f"prompt has {len(prompt)} tokens, but max_model_len is {max_model_len} "
            f"(prompt + at least 1 generated token); shorten the prompt or raise --max-model-len"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_token(name: str, token_id: int, vocab_size: int) -> None:
    """One token id (e.g. a prefilled first token handed to the decode side)."""
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name} {token_id} is outside the vocabulary [0, {vocab_size})")
