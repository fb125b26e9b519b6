"""Per-request sampling parameters."""

from __future__ import annotations

import math
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
MAX_PENALTY = 2.0
"""presence_penalty / frequency_penalty lie in [-2, 2] (the OpenAI API's range)."""
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
"""A bias lies in [-100, 100] (OpenAI): enough to forbid (-100) or force (+100) a token."""
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGPROBS = 20
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
        errors = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            errors.append(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        elif self.max_tokens > MAX_TOKEN_ID:
            errors.append(f"max_tokens must be <= {MAX_TOKEN_ID}, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            errors.append(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            errors.append(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {t}"
            )
        if self.top_k is not None and not 1 <= self.top_k <= MAX_TOKEN_ID:
            errors.append(f"top_k must be in [1, {MAX_TOKEN_ID}] or None, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            errors.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        errors += _check_stop_ids(self.stop_token_ids)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            errors.append(f"seed must be in [0, {MAX_SEED}] or None, got {self.seed}")
        errors += self._check_controls()
        if errors:
            raise ValueError("invalid sampling params: " + "; ".join(errors))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))  # fmt: skip

    def _check_controls(self) -> list[str]:
        errors = []
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                errors.append(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v}")
        rp = self.repetition_penalty
        if not _finite(rp) or not 0 < rp <= MAX_REPETITION_PENALTY:
            errors.append(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {rp}")  # fmt: skip
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            errors.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            errors.append(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")  # fmt: skip
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            errors.append("structured must be a StructuredOutput")
        return errors + _check_bias(self.logit_bias)

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


def _check_stop_ids(ids) -> list[str]:
    ids = tuple(ids)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return [f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"]
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID]
    return [f"stop_token_ids must be ids in [0, {MAX_TOKEN_ID}], got {bad[0]}"] if bad else []


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bias(bias) -> list[str]:
    bias = tuple(bias)
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        return [f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(bias)}"]
    for item in bias:
        if not (isinstance(item, tuple) and len(item) == 2):
            return [f"logit_bias entries must be (token id, bias) pairs, got {item!r}"]
        t, b = item
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_TOKEN_ID:
            return [f"logit_bias token ids must be in [0, {MAX_TOKEN_ID}], got {t!r}"]
        if not _finite(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            return [f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {b!r} for token {t}"]  # fmt: skip
    if len({t for t, _ in bias}) != len(bias):
        return ["logit_bias names a token id twice"]
    return []
