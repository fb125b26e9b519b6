"""Grammar-mask libraries compared: xgrammar vs llguidance, mask time per decode step.

For each vocabulary (the tiny model's 512-token BPE, and a 32k byte-level BPE trained
here on the Python standard library's sources, the size class of Llama-2/Mistral) and
each JSON schema, both libraries compile the schema once, then walk the tokens of a valid
document: each step computes the next-token bitmask of a batch of ``--batch`` matchers
(the libraries' own batched, multi-threaded entry points) and accepts one token in each.
Reported: compile time, and per step the median / p90 time of one batch's mask.

    python -m bench.grammar_libs --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

logger = logging.getLogger("bench.grammar_libs")

SCHEMAS: dict[str, tuple[dict, object]] = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["name", "age", "email", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poet"]},
    ),
    "order": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                            "qty": {"type": "integer", "minimum": 1},
                            "price": {"type": "number"},
                        },
                        "required": ["sku", "qty", "price"],
                        "additionalProperties": False,
                    },
                },
                "note": {"type": ["string", "null"]},
            },
            "required": ["id", "status", "items", "note"],
            "additionalProperties": False,
        },
        {
            "id": 90210,
            "status": "shipped",
            "items": [
                {"sku": "ABC-1234", "qty": 2, "price": 9.5},
                {"sku": "XYZ-0001", "qty": 1, "price": 120.25},
            ],
            "note": None,
        },
    ),
}


def corpus_lines() -> list[str]:
    """A few MB of the standard library's Python sources (deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("**/*.py"))[:3000]
    return [line for p in files for line in p.read_text(errors="ignore").splitlines(True)]


def big_tokenizer(vocab: int, cache: Path) -> Path:
    path = cache / f"bench-bpe-{vocab}.json"
    if not path.is_file():
        logger.info("training a %d-token byte-level BPE on the stdlib sources", vocab)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus_lines(), trainer)
        cache.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return path


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok_path: Path) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        tok = Tokenizer.from_file(str(tok_path))
        vocab = tok.get_vocab(with_added_tokens=True)
        encoded = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            encoded[i] = piece
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        eos = tok.token_to_id("<|endoftext|>")
        self.vocab_size = len(encoded)
        info = xgr.TokenizerInfo(
            encoded, meta["vocab_type"], vocab_size=self.vocab_size, stop_token_ids=[eos],
            add_prefix_space=meta["add_prefix_space"],
        )  # fmt: skip
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers: list, token: int) -> None:
        for m in matchers:
            assert m.accept_token(token), "token refused"


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok_path: Path) -> None:
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        tok = Tokenizer.from_file(str(tok_path))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id("<|endoftext|>")
        self.tokenizer = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
        self.executor = llguidance.LLExecutor(2)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_flexible": False}
        )
        self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        return grammar

    def matchers(self, compiled, n: int) -> list:
        return [self.llg.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def accept(self, matchers: list, token: int) -> None:
        for m in matchers:
            assert m.consume_token(token), m.get_error()


def measure(lib, tok_path: Path, schema: dict, doc: object, batch: int, repeats: int) -> dict:
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(json.dumps(doc, separators=(",", ":"))).ids
    t0 = time.perf_counter()
    compiled = lib.compile(schema)
    compile_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        matchers = lib.matchers(compiled, batch)
        bitmask = lib.bitmask(batch)
        for token in ids:
            t0 = time.perf_counter()
            lib.fill(matchers, bitmask)
            times.append((time.perf_counter() - t0) * 1e6)
            allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
            assert allowed, f"{lib.name}: the mask refuses token {token} of a valid document"
            lib.accept(matchers, token)
    times.sort()
    return {
        "compile_ms": round(compile_ms, 2),
        "mask_us_median": round(statistics.median(times), 1),
        "mask_us_p90": round(times[int(0.9 * (len(times) - 1))], 1),
        "steps": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="matchers per batched mask")
    parser.add_argument("--vocab", type=int, default=32000, help="size of the trained BPE")
    parser.add_argument("--repeats", type=int, default=5, help="walks of each document")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from engine.tiny_model import train_tokenizer

    cache = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    tiny = cache / "bench-bpe-tiny.json"
    if not tiny.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        train_tokenizer().save(str(tiny))
    vocabs = {"tiny-512": tiny, f"bpe-{args.vocab}": big_tokenizer(args.vocab, cache)}
    results: dict = {"batch": args.batch, "load_average": os.getloadavg()[0]}
    for vname, path in vocabs.items():
        for cls in (XGrammar, LLGuidance):
            t0 = time.perf_counter()
            lib = cls(path)
            setup_ms = round((time.perf_counter() - t0) * 1e3, 1)
            for sname, (schema, doc) in SCHEMAS.items():
                r = measure(lib, path, schema, doc, args.batch, args.repeats)
                results[f"{vname}/{lib.name}/{sname}"] = {"tokenizer_setup_ms": setup_ms, **r}
                logger.info("%s %s %s: %s", vname, lib.name, sname, r)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(k, v)


if __name__ == "__main__":
    main()
