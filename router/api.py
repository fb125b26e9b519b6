"""OpenAI response shapes: completion and chat completion, full and streamed (SSE).

A request's choices (``n``) arrive as ``(index, Output)`` pairs (router/choices.py); each
choice keeps its own state: its logprob text offsets, whether its first chunk was sent,
and, for chat with tools, a tool-call parser (router/tools/parser.py) that splits its
text into ``content`` and ``tool_calls`` the same way whether streamed or not. With
``echo`` every choice starts with the prompt (and, with ``logprobs``, the prompt tokens'
logprobs, the first one ``None``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.tokenizer import Tokenizer
from proto import worker_pb2 as pb
from router.job import Output
from router.tools.formats import ToolFormat
from router.tools.parser import ToolParser


def usage(outs: list[Output]) -> dict:
    """Usage over the last output of every choice: the prompt counted once."""
    prompt = outs[0].prompt_tokens
    completion = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": max(o.cached_tokens for o in outs)},
    }


def sse(payload: dict | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


@dataclass
class Echo:
    """What ``echo`` prepends to every choice."""

    text: str
    prompt: list[int]


@dataclass
class _Choice:
    index: int
    offset: int = 0
    first: bool = True
    tools: ToolParser | None = None
    last: Output | None = None


@dataclass
class Shaper:
    """Builds one request's response objects; ``kind`` is ``completion`` or ``chat``."""

    kind: str
    request_id: str
    model: str
    tokenizer: Tokenizer
    logprobs: int | None
    """Top-n alternatives to report per token (``None`` = no logprobs)."""
    return_token_ids: bool = False
    echo: Echo | None = None
    tool_format: ToolFormat | None = None
    """Parse tool calls out of chat output in this format (``None``: plain content)."""
    named_tool: bool = False
    """tool_choice named a function: a call ends with finish_reason ``stop`` (OpenAI)."""
    created: int = field(default_factory=lambda: int(time.time()))
    _choices: dict[int, _Choice] = field(default_factory=dict)
    _prompt_lps: list[pb.Token] | None = None

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def _choice(self, index: int) -> _Choice:
        if index not in self._choices:
            parser = ToolParser(self.tool_format) if self.tool_format else None
            self._choices[index] = _Choice(index, tools=parser)
        return self._choices[index]

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- logprobs -----------------------------------------------------------------------

    def _chat_logprobs(self, tokens: list[pb.Token]) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for t in tokens:
            s = self._piece(t.token_id)
            tops = [(self._piece(x.token_id), x.logprob) for x in t.top_logprobs[: self.logprobs]]
            content.append(
                {
                    "token": s,
                    "logprob": t.logprob,
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in tops
                    ],  # fmt: skip
                }
            )
        return {"content": content}

    def _completion_logprobs(self, c: _Choice, tokens: list[pb.Token], prompt: bool) -> dict | None:  # fmt: skip
        if self.logprobs is None:
            return None
        top_n, out = self.logprobs, {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}  # fmt: skip
        if prompt:  # the echoed prompt: its first token has no logprob
            first = self.echo.prompt[0]
            self._add(c, out, self._piece(first), None, None)
        for t in tokens:
            tops = {self._piece(x.token_id): x.logprob for x in t.top_logprobs[:top_n]}
            lp = t.logprob if t.HasField("logprob") else None
            self._add(c, out, self._piece(t.token_id), lp, tops)
        return out

    @staticmethod
    def _add(c: _Choice, out: dict, piece: str, lp, tops) -> None:
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(tops)
        out["text_offset"].append(c.offset)
        c.offset += len(piece)

    # -- one step of one choice ---------------------------------------------------------

    def _step(self, c: _Choice, out: Output) -> dict:
        """The choice object for ``out`` (a delta when streaming)."""
        if out.prompt_logprobs is not None and self._prompt_lps is None:
            self._prompt_lps = out.prompt_logprobs
        echo = self.echo is not None and c.first
        choice: dict = {"index": c.index}
        if self.kind == "completion":
            choice["text"] = (self.echo.text if echo else "") + out.text
            tokens = (list(self._prompt_lps or []) if echo else []) + list(out.tokens)
            choice["logprobs"] = self._completion_logprobs(c, tokens, echo)
        else:
            choice["delta"] = self._delta(c, out)
            choice["logprobs"] = self._chat_logprobs(out.tokens)
        choice["finish_reason"] = self._finish_reason(c, out.finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = out.token_ids
        c.first, c.last = False, out
        return choice

    def _delta(self, c: _Choice, out: Output) -> dict:
        delta: dict = {"role": "assistant"} if c.first else {}
        if c.tools is None:
            delta["content"] = out.text
            return delta
        parts = c.tools.feed(out.text) + (c.tools.finish() if out.finish_reason else [])
        content = "".join(p[1] for p in parts if p[0] == "content")
        calls = [p[1] for p in parts if p[0] == "tool"]
        if content or not calls:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _finish_reason(self, c: _Choice, reason: str | None) -> str | None:
        if reason == "stop" and c.tools is not None and c.tools.calls and not self.named_tool:
            return "tool_calls"
        return reason

    def _base(self, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    # -- whole responses and streams ----------------------------------------------------

    def full(self, items: list[tuple[int, Output]]) -> dict:
        """One JSON body from every choice's outputs, in arrival order."""
        steps: dict[int, list[dict]] = {}
        for index, out in items:
            steps.setdefault(index, []).append(self._step(self._choice(index), out))
        choices = [self._merge(steps[i]) for i in sorted(steps)]
        lasts = [self._choices[i].last for i in sorted(steps)]
        return {**self._base(False), "choices": choices, "usage": usage(lasts)}

    def _merge(self, parts: list[dict]) -> dict:
        last = parts[-1]
        choice: dict = {"index": last["index"]}
        if self.kind == "completion":
            choice["text"] = "".join(p["text"] for p in parts)
            choice["logprobs"] = _merge_logprobs([p["logprobs"] for p in parts])
        else:
            content = "".join(p["delta"].get("content") or "" for p in parts)
            calls = _merge_calls([c for p in parts for c in p["delta"].get("tool_calls", ())])
            msg: dict = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            choice["message"] = msg
            lps = [p["logprobs"] for p in parts]
            choice["logprobs"] = None if lps[0] is None else {"content": [x for lp in lps for x in lp["content"]]}  # fmt: skip
        choice["finish_reason"] = last["finish_reason"]
        if self.return_token_ids:
            choice["token_ids"] = [i for p in parts for i in p["token_ids"]]
        return choice

    def chunk(self, index: int, out: Output, include_usage: bool) -> dict:
        body = {**self._base(True), "choices": [self._step(self._choice(index), out)]}
        if include_usage:
            body["usage"] = None
        return body

    async def stream(
        self, items: AsyncIterator[tuple[int, Output]], include_usage: bool, on_error
    ) -> AsyncIterator[str]:
        try:
            async for index, out in items:
                body = self.chunk(index, out, include_usage)
                if not _empty(body["choices"][0]):
                    yield sse(body)
        except Exception as exc:  # headers are sent: report in-band, like OpenAI
            yield sse(on_error(exc))
            yield sse("[DONE]")
            return
        lasts = [c.last for _, c in sorted(self._choices.items()) if c.last is not None]
        if include_usage and lasts:
            yield sse({**self._base(True), "choices": [], "usage": usage(lasts)})
        yield sse("[DONE]")


def _empty(choice: dict) -> bool:
    """A chat delta with nothing to say (tool-call text held back by the parser)."""
    delta = choice.get("delta")
    return (
        delta is not None
        and delta in ({}, {"content": ""})
        and choice["finish_reason"] is None
        and choice["logprobs"] is None
        and not choice.get("token_ids")
    )


def _merge_logprobs(parts: list[dict | None]) -> dict | None:
    if parts[0] is None:
        return None
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def _merge_calls(deltas: list[dict]) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:
            calls[d["index"]] = {"id": d["id"], "type": "function", "function": dict(d["function"])}
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]
