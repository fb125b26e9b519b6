"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and merges, so each step decodes a
short window and emits only text that can no longer change::

    ids:    [ ... | prefix_offset ... read_offset | new ids ]
    text = decode(ids[prefix:]) minus decode(ids[prefix:read])   (if it does not end in
                                                                  a partial character)

Stop strings may span tokens: the last ``max(len(stop)) - 1`` characters are held back
until they cannot start a stop string; a match truncates the text before the stop.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self._tok = tokenizer
        self._stop = list(stop or [])
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed tokens; returns the new text that is safe to emit."""
        if self.stopped:
            return ""
        for t in token_ids:
            self._ids.append(t)
            self.text += self._delta()
        if self._stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self.flush()
        safe = max(self._emitted, len(self.text) - self._hold)
        out, self._emitted = self.text[self._emitted : safe], safe
        return out

    def flush(self) -> str:
        """Everything not emitted yet (call once the request finished)."""
        if not self.stopped and self._read < len(self._ids):
            prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
            self.text += self._tok.decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._prefix = self._read = len(self._ids)
        out, self._emitted = self.text[self._emitted :], len(self.text)
        return out

    def _delta(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""
