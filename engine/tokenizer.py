"""Tokenizer for a checkpoint directory: ``tokenizer.json`` + ``tokenizer_config.json``.

Uses the ``tokenizers`` library directly and renders chat templates with a sandboxed
Jinja2 environment, so serving processes do not import ``transformers``. The template is
compiled once, on first use, and is safe to render from several threads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class PromptTooLong(ValueError):
    """A text has more tokens than the caller's limit (its ids were never materialised)."""

    def __init__(self, num_tokens: int, limit: int) -> None:
        super().__init__(f"the text has {num_tokens} tokens; the limit is {limit}")
        self.num_tokens, self.limit = num_tokens, limit


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody reads.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {model_dir}; pass token ids instead of text"
            )
        cfg_path = root / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(_HFTokenizer.from_file(str(path)), config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(
        self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None
    ) -> list[int]:
        """Token ids of ``text``; over ``max_tokens`` raises :class:`PromptTooLong` without
        building the Python list (for a huge text that list costs more than encoding).

        The batch entry point releases the GIL while it encodes (``encode`` holds it), so a
        long text tokenized on another thread does not stall the caller's event loop."""
        encoding = self._encode_batch([text], add_special_tokens=False)[0]
        if max_tokens is not None and len(encoding) > max_tokens:
            raise PromptTooLong(len(encoding), max_tokens)
        ids = encoding.ids
        if add_special_tokens and self.add_bos:
            bos = self._tok.token_to_id(self.bos_token)
            if not ids or ids[0] != bos:
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and ``tools``, OpenAI ``{"type": "function", "function":
        {...}}`` dicts, as transformers passes them) with the checkpoint's chat template."""
        return self._template.render(
            messages=messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    @functools.cached_property
    def _template(self) -> Template:
        if not self.chat_template:
            raise ValueError(
                "this model's tokenizer_config.json has no chat_template; use /v1/completions"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:  # fmt: skip
    """transformers' ``tojson``: plain ``json.dumps`` (Jinja's own escapes ``<``, ``>``, ``&``
    for HTML, which would change what the model reads)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # fmt: skip


def _raise(message: str) -> None:
    raise ValueError(message)
