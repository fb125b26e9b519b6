"""Per-request sampling parameters.

``SamplingParams`` refuses, with a ``ValueError`` naming every bad field, its value and
its limit, whatever the engine, the batched sampler or worker.proto could not hold; the
router's request models (router/protocol.py) carry the same bounds, so the offline API,
the workers and the HTTP edge accept the same values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MIN_TEMPERATURE = 0.01
"""Smallest non-zero temperature: below it ``logits / temperature`` overflows float32 for
ordinary logits (softmax turns inf into NaN). 0 means greedy."""
MAX_TEMPERATURE = 100.0
MAX_TOKEN_ID = 2**31 - 1
"""Token ids, ``top_k`` and token counts must fit the int32/uint32 fields of the proto and
of torch index tensors; vocabulary bounds are checked by the engine that knows its model."""
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20
"""Most top alternatives per token (as OpenAI's ``top_logprobs``)."""
MAX_PENALTY = 2.0
"""presence_penalty / frequency_penalty lie in [-2, 2] (the OpenAI API's range)."""
MIN_REPETITION_PENALTY = 0.01
"""Smallest repetition penalty: it divides positive logits as a temperature does, and
below this (e.g. 5e-324, found by the OpenAPI fuzzer) they overflow float32."""
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
"""A bias lies in [-100, 100] (OpenAI): enough to forbid (-100) or force (+100) a token."""
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_GRAMMAR_CHARS = 256 * 1024
"""Characters of one structured-output spec (a JSON schema, a regex, a grammar)."""

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the whole output, applied as a token mask (engine/grammar.py)."""

    kind: StructuredKind
    """``json`` (``spec`` is a JSON schema), ``json_object`` (any JSON object; ``spec`` is
    empty), ``regex``, ``choice`` (``spec`` is a JSON list of strings) or ``grammar``
    (a Lark or GBNF grammar, as llguidance reads them)."""
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")  # fmt: skip
        if not isinstance(self.spec, str) or len(self.spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured output spec must be a string of at most {MAX_GRAMMAR_CHARS} characters")  # fmt: skip
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output of kind {self.kind!r} needs a spec")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """Suppress EOS and stop tokens until this many tokens were generated."""
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int | None = None
    """Keep the k most likely tokens (``None`` = all)."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches ``top_p``."""
    seed: int | None = None
    """Per-request seed; the same seed gives the same tokens."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Stop after generating any of these (the token is kept in the output)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token."""
    logprobs: int | None = None
    """Return the log-probabilities of this many top tokens per step (plus the chosen one)."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtract this times the token's count in the output so far (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divide positive / multiply negative logits of tokens in the prompt or the output
    (vLLM and Hugging Face ``RepetitionPenaltyLogitsProcessor``); 1 = off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` pairs added to the logits before anything else."""
    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the most likely one's."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar."""
    prompt_logprobs: int | None = None
    """Return the log-probability of every prompt token after the first, with this many
    top alternatives (prefix-cache hits are not used for such a request)."""

    def __post_init__(self) -> None:
        errors = [e for e in (_check_counts(self), *_check_sampling(self)) if e]
        errors += _check_stop_ids(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            errors.append(f"ignore_eos must be a bool, got {_shown(self.ignore_eos)}")
        errors += _check_controls(self)
        if errors:
            raise ValueError("invalid sampling params: " + "; ".join(errors))
        self._normalise()

    def _normalise(self) -> None:
        # Plain Python numbers from here on (numpy ints, float-like ints): the proto and
        # torch take them as they are.
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else int(value))
        for name in ("temperature", "top_p", *_CONTROLS):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        object.__setattr__(self, "logit_bias", bias)

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0  # fmt: skip

    @property
    def needs_state(self) -> bool:
        """Whether the sampler keeps per-request state (token counts, a grammar matcher)."""
        return self.has_penalties or self.structured is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (EP step broadcast)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        d = dict(d)
        d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
        d["logit_bias"] = tuple(tuple(x) for x in d.get("logit_bias", ()))
        if d.get("structured") is not None:
            d["structured"] = StructuredOutput(**d["structured"])
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value)


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a hostile value must not fill the error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_counts(p: SamplingParams) -> str | None:
    errors = []
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        errors.append(f"max_tokens must be an int >= 1, got {_shown(p.max_tokens)}")
    elif p.max_tokens > MAX_TOKEN_ID:
        errors.append(f"max_tokens must be <= {MAX_TOKEN_ID}, got {p.max_tokens}")
    most = p.max_tokens if not errors else MAX_TOKEN_ID
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= most:
        limit = f"max_tokens={most}" if not errors else str(most)
        errors.append(f"min_tokens must be in [0, {limit}], got {_shown(p.min_tokens)}")
    return "; ".join(errors) or None


def _check_sampling(p: SamplingParams) -> list[str | None]:
    t, top_p = p.temperature, p.top_p
    errors = [
        _optional_int("top_k", p.top_k, 1, MAX_TOKEN_ID),
        _optional_int("logprobs", p.logprobs, 0, MAX_LOGPROBS),
        _optional_int("seed", p.seed, 0, MAX_SEED),
    ]
    if not _is_real(t) or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        errors.append(
            f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
            f"got {_shown(t)}"
        )
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        errors.append(f"top_p must be in (0, 1], got {_shown(top_p)}")
    return errors


def _optional_int(name: str, value: object, lo: int, hi: int) -> str | None:
    if value is None or (_is_int(value) and lo <= value <= hi):
        return None
    return f"{name} must be in [{lo}, {hi}] or None, got {_shown(value)}"


def _check_stop_ids(ids: object) -> list[str]:
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        return [f"stop_token_ids must be a list of token ids, got {_shown(ids)}"]
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return [f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"]
    bad = [t for t in ids if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID]
    if bad:
        return [f"stop_token_ids must be ids in [0, {MAX_TOKEN_ID}], got {_shown(bad[0])}"]
    return []


_CONTROLS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")


def _check_controls(p: SamplingParams) -> list[str]:
    errors = []
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
            errors.append(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {_shown(v)}")
    rp = p.repetition_penalty
    if not _is_real(rp) or not MIN_REPETITION_PENALTY <= rp <= MAX_REPETITION_PENALTY:
        errors.append(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], got {_shown(rp)}")  # fmt: skip
    if not _is_real(p.min_p) or not 0.0 <= p.min_p <= 1.0:
        errors.append(f"min_p must be in [0, 1], got {_shown(p.min_p)}")
    errors.append(_optional_int("prompt_logprobs", p.prompt_logprobs, 0, MAX_LOGPROBS))
    if p.structured is not None and not isinstance(p.structured, StructuredOutput):
        errors.append(f"structured must be a StructuredOutput or None, got {_shown(p.structured)}")
    return [e for e in errors if e] + _check_bias(p.logit_bias)


def _check_bias(bias: object) -> list[str]:
    if not isinstance(bias, Sequence) or isinstance(bias, (str, bytes)):
        return [f"logit_bias must be a list of (token id, bias) pairs, got {_shown(bias)}"]
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        return [f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(bias)}"]
    for item in bias:
        if not (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2):  # fmt: skip
            return [f"logit_bias must be a list of (token id, bias) pairs, got {_shown(item)}"]
        t, b = item
        if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID:
            return [f"logit_bias token ids must be in [0, {MAX_TOKEN_ID}], got {_shown(t)}"]
        if not _is_real(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            return [f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {_shown(b)} for token {t}"]  # fmt: skip
    if len({int(t) for t, _ in bias}) != len(bias):
        return ["logit_bias names a token id twice"]
    return []
