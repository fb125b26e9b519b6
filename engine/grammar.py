"""Structured output: grammars compiled once per spec, matchers per request, token masks.

Built on llguidance (see the README for why it and not xgrammar): a spec
(``StructuredOutput``: JSON schema, any JSON object, regex, choice, Lark/GBNF grammar)
becomes an llguidance grammar, which is validated and compiled against the model's
tokenizer once and kept in an LRU cache; each request gets a copy of the compiled,
never-advanced matcher. The backend is thread-safe and compiling drops the GIL, so a
worker's gRPC handler compiles a request's grammar (:meth:`GrammarBackend.prepare`, in an
executor thread) before it submits the request to the engine thread, which then finds
the grammar in the cache: compiling a new schema (milliseconds; more for a large one)
never stalls a step.

Per step the sampler asks :func:`fill_masks` for the bitmask of every grammar row (one
batched, multi-threaded llguidance call that drops the GIL: the model runner starts it
before the forward pass and waits for it after) and the sampled token is consumed into
each row's matcher. JSON is written as json.dumps writes it (no free whitespace): a
model cannot pad its output with endless blanks, and the output is still valid JSON.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from engine.sampling_params import StructuredOutput

logger = logging.getLogger(__name__)

CACHE_SIZE = 512
"""Compiled grammars kept (LRU); a compiled grammar is small (lexer states, no masks)."""
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""One space after `,` and `:` (as json.dumps writes, and most models were trained on),
none elsewhere."""
MASK_THREADS_MAX = 4
"""llguidance threads filling one step's masks: half the cores, 1 to 4 (the other half
runs the model step they overlap with, on CPU)."""
SLICED_VOCAB = 4096
"""llguidance's token "slices" speed masks up for large vocabularies (measured: -20 to
-40% per step at 32k-128k tokens) and slow them down for small ones (+200% at 512)."""


class GrammarError(ValueError):
    """A spec that is not valid, or that llguidance cannot compile; the message says why."""


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar for ``so`` (raises :class:`GrammarError` for a bad spec)."""
    import llguidance

    try:
        if so.kind == "json":
            schema = json.loads(so.spec)
            if not isinstance(schema, (dict, bool)):
                raise GrammarError("a JSON schema must be an object (or true/false)")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if so.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides=JSON_OPTIONS
            )
        if so.kind == "choice":
            choices = json.loads(so.spec)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):  # fmt: skip
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llguidance.grammar_from("choice", so.spec)
        if so.kind == "regex":
            return llguidance.grammar_from("regex", so.spec)
        return llguidance.grammar_from("grammar", so.spec)
    except (json.JSONDecodeError, TypeError) as exc:
        raise GrammarError(f"{so.kind} spec is not valid JSON: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, GrammarError):
            raise
        raise GrammarError(f"invalid {so.kind} spec: {exc}") from None


class GrammarBackend:
    """One tokenizer's grammar compiler and cache; thread-safe."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._lock = threading.Lock()
        self._tokenizer = None
        self._cache: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._executor = None
        self.num_compiled = 0
        """Grammars compiled since start (a test shows the cache works with it)."""

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            return self._tokenizer

    def _load_tokenizer(self):
        import llguidance

        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise GrammarError(
                f"structured output needs the model's tokenizer.json, and {self.model_dir} has none"
            )
        if not self.eos_token_ids:
            raise GrammarError("structured output needs an EOS token; the model config names none")  # fmt: skip
        slices = None if self.vocab_size >= SLICED_VOCAB else []
        return llguidance.LLTokenizer(
            path.read_text(),
            n_vocab=self.vocab_size,
            eos_token=list(self.eos_token_ids),
            slices=slices,
        )

    def prepare(self, so: StructuredOutput | None) -> None:
        """Compile ``so`` into the cache unless it is there; :class:`GrammarError` (a
        ``ValueError``) names what is wrong with a spec that is invalid or that llguidance
        cannot compile. Thread-safe; llguidance compiles without the GIL."""
        if so is None:
            return
        try:
            self._compiled(so)
        except GrammarError:
            raise
        except Exception as exc:  # the library's own errors are the request's problem
            raise GrammarError(f"structured output: {exc}") from None

    def matcher(self, so: StructuredOutput):
        """A fresh matcher at the start of ``so``'s grammar."""
        return self._compiled(so).deep_copy()

    def _compiled(self, so: StructuredOutput):
        with self._lock:
            hit = self._cache.get(so)
            if hit is not None:
                self._cache.move_to_end(so)
                return hit
        proto = self._compile(so)
        with self._lock:
            self._cache[so] = proto
            self.num_compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto

    def _compile(self, so: StructuredOutput):
        import llguidance

        text = grammar_text(so)
        # The constructor never raises: a grammar it cannot build leaves it in error.
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {so.kind} spec cannot be compiled: {matcher.get_error()}")
        return matcher

    @property
    def executor(self):
        import llguidance

        with self._lock:
            if self._executor is None:
                threads = max(1, min(MASK_THREADS_MAX, (os.cpu_count() or 2) // 2))
                self._executor = llguidance.LLExecutor(threads)
            return self._executor


def fill_masks(backend: GrammarBackend, matchers: list) -> torch.Tensor:
    """int32 bitmask ``[len(matchers), ceil(V / 32)]`` (bit ``t % 32`` of word ``t // 32``
    set = token ``t`` allowed) of every matcher's next step; drops the GIL."""
    # llguidance.torch wraps the same call but imports torch.compile machinery.
    words = -(-backend.vocab_size // 32)
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    pairs = [(m, i) for i, m in enumerate(matchers)]
    backend.executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(matchers))
    return bitmask


_BITS = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool ``[rows, vocab_size]``: True where the token is allowed."""
    shifts = _BITS.get(device)
    if shifts is None:
        shifts = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()
