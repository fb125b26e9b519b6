"""Output text -> content and ``tool_calls``, incrementally, in one code path for streaming
and whole responses (a whole response is the stream's deltas joined, so both agree).

    text ──feed()──> [("content", "...") | ("tool", delta)] ──finish()──> the rest

A tool call's deltas are those of the OpenAI stream: first ``{index, id, type, function:
{name, arguments: ""}}`` once its name is known, then ``{index, function: {arguments}}``
pieces as the arguments object is generated. ``arguments`` is the object's text as the
model wrote it (valid JSON for a complete call). Text that only might start a call
(a prefix of ``<tool_call>``) is held back until it is decided; a call cut off before its
name is known is returned as content.
"""

from __future__ import annotations

import json
import uuid

from router.tools.formats import ToolFormat

_DECODER = json.JSONDecoder()
WS = " \t\r\n"


def _skip(buf: str, pos: int) -> int:
    while pos < len(buf) and buf[pos] in WS:
        pos += 1
    return pos


def scan_object(buf: str, args_key: str) -> tuple[str | None, int | None, int | None, int | None]:
    """A (possibly incomplete) JSON object at the start of ``buf``: ``(name, args_start,
    args_end, end)``; positions are ``None`` until known, ``end`` until it is complete."""
    name = args_start = args_end = None
    pos = _skip(buf, 0)
    if pos >= len(buf) or buf[pos] != "{":
        return None, None, None, None
    pos += 1
    while True:
        pos = _skip(buf, pos)
        if pos < len(buf) and buf[pos] == "}":
            return name, args_start, args_end, pos + 1
        try:
            key, pos = _DECODER.raw_decode(buf, pos)
        except ValueError:
            return name, args_start, args_end, None
        pos = _skip(buf, pos)
        if pos >= len(buf) or buf[pos] != ":":
            return name, args_start, args_end, None
        start = pos = _skip(buf, pos + 1)
        if key == args_key:
            args_start = start
        try:
            value, pos = _DECODER.raw_decode(buf, start)
        except ValueError:
            return name, args_start, args_end, None
        if pos >= len(buf):  # a number could still grow: not known to be complete
            return name, args_start, args_end, None
        if key == "name" and isinstance(value, str):
            name = value
        if key == args_key:
            args_end = pos
        pos = _skip(buf, pos)
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
        elif pos < len(buf) and buf[pos] != "}":
            return name, args_start, args_end, None


def _held(buf: str, marker: str) -> int:
    """Length of the longest end of ``buf`` that begins ``marker``."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ToolParser:
    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.buf = ""
        self.mode = "text" if fmt.start else "start"
        """start (llama3: not decided yet) | text | call | after (a call ended) | plain
        (the rest is content)."""
        self.calls: list[dict] = []
        self._sent = 0
        """Characters of the current call's arguments already emitted."""

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> list[tuple]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple]:
        out: list[tuple] = []
        while True:
            steps = {"start": self._start, "text": self._text, "call": self._call, "after": self._after}  # fmt: skip
            step = steps.get(self.mode)
            if step is None:  # plain
                if self.buf:
                    out.append(("content", self.buf))
                    self.buf = ""
                return out
            if not step(out, final):
                return out

    def _start(self, out: list, final: bool) -> bool:
        stripped = self.buf.lstrip(WS)
        p = self.fmt.prefix
        if stripped.startswith(p) and p:
            self.buf, self.mode = stripped[len(p) :], "call"
        elif stripped.startswith("{"):
            self.buf, self.mode = stripped, "call"
        elif final or (stripped and not (p and p.startswith(stripped))):
            self.mode = "plain"
        else:
            return False
        return True

    def _text(self, out: list, final: bool) -> bool:
        i = self.buf.find(self.fmt.start)
        if i < 0:
            keep = 0 if final else _held(self.buf, self.fmt.start)
            piece = self.buf[: len(self.buf) - keep]
            if self._between_calls(piece):  # held: another call may follow
                if final:
                    self.buf = ""
                return False
            if piece:
                out.append(("content", piece))
                self.buf = self.buf[len(piece) :]
            return False
        if i and not self._between_calls(self.buf[:i]):
            out.append(("content", self.buf[:i]))
        self.buf, self.mode = self.buf[i + len(self.fmt.start) :], "call"
        return True

    def _between_calls(self, piece: str) -> bool:
        """Whitespace after a call separates calls; it is not content."""
        return bool(self.calls) and not piece.strip(WS)

    def _call(self, out: list, final: bool) -> bool:
        name, a0, a1, end = scan_object(self.buf, self.fmt.args_key)
        if name is not None and (not self.calls or self.calls[-1]["open"] is False):
            self._open(out, name)
        if self.calls and self.calls[-1]["open"] and a0 is not None:
            self._args(out, self.buf[a0 : a1 if a1 is not None else len(self.buf)])
        if end is None:
            if final:
                self._broken(out)
            return False
        if not self.calls or not self.calls[-1]["open"]:  # an object without a name
            out.append(("content", self._raw_call(self.buf[:end])))
        elif a0 is None:
            self._args(out, "{}")
        if self.calls:
            self.calls[-1]["open"] = False
        return self._close(out, end, final)

    def _open(self, out: list, name: str) -> None:
        call = {"index": len(self.calls), "id": f"call_{uuid.uuid4().hex[:24]}", "name": name}
        self.calls.append({**call, "open": True, "arguments": ""})
        self._sent = 0
        fn = {"name": name, "arguments": ""}
        out.append(("tool", {"index": call["index"], "id": call["id"], "type": "function", "function": fn}))  # fmt: skip

    def _args(self, out: list, text: str) -> None:
        piece = text[self._sent :]
        if piece:
            self._sent = len(text)
            self.calls[-1]["arguments"] += piece
            out.append(("tool", {"index": self.calls[-1]["index"], "function": {"arguments": piece}}))  # fmt: skip

    def _close(self, out: list, end: int, final: bool) -> bool:
        self.buf, self.mode = self.buf[end:], "after"
        return True

    def _after(self, out: list, final: bool) -> bool:
        """Between a complete call and what follows: hermes' end marker, llama3's ``;``."""
        r = self.buf.lstrip(WS)
        close = self.fmt.end if self.fmt.end is not None else ";"
        if r.startswith(close):
            self.buf = r[len(close) :]
            self.mode = "text" if self.fmt.end is not None else "call"
            return True
        if not final and close.startswith(r):  # (part of) the marker may still come
            return False
        self.mode = "text" if self.fmt.end is not None else "plain"
        return True

    def _broken(self, out: list) -> None:
        """A call cut off (``finish_reason: length``): without a name it is content."""
        if not self.calls or not self.calls[-1]["open"]:
            out.append(("content", self._raw_call(self.buf)))
        self.buf, self.mode = "", "plain"

    def _raw_call(self, body: str) -> str:
        return (self.fmt.start or "") + body
