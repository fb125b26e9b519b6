"""OpenAI response shapes: completion and chat completion, full and streamed (SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.tokenizer import Tokenizer
from proto import worker_pb2 as pb
from router.job import Output


def usage(out: Output) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


def sse(payload: dict | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n"


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
    created: int = field(default_factory=lambda: int(time.time()))
    _offset: int = 0

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, tokens: list[pb.Token], text: str) -> dict | None:
        if self.logprobs is None:
            return None
        top_n = self.logprobs
        if self.kind == "chat":
            content = []
            for t in tokens:
                s = self._piece(t.token_id)
                tops = [(self._piece(x.token_id), x.logprob) for x in t.top_logprobs[:top_n]]
                content.append(
                    {
                        "token": s,
                        "logprob": t.logprob,
                        "bytes": list(s.encode()),
                        "top_logprobs": [
                            {"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in tops
                        ],
                    }
                )
            return {"content": content}
        pieces = [self._piece(t.token_id) for t in tokens]
        offsets = []
        for p in pieces:
            offsets.append(self._offset)
            self._offset += len(p)
        return {
            "tokens": pieces,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                {self._piece(x.token_id): x.logprob for x in t.top_logprobs[:top_n]} for t in tokens
            ],
            "text_offset": offsets,
        }

    def _base(self, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def full(self, outs: list[Output]) -> dict:
        text = "".join(o.text for o in outs)
        tokens = [t for o in outs for t in o.tokens]
        last = outs[-1]
        choice: dict = {"index": 0, "logprobs": self._logprobs(tokens, text)}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = last.finish_reason
        if self.return_token_ids:
            choice["token_ids"] = [i for o in outs for i in o.token_ids]
        return {**self._base(False), "choices": [choice], "usage": usage(last)}

    def chunk(self, out: Output, first: bool, include_usage: bool) -> dict:
        choice: dict = {"index": 0}
        if self.kind == "chat":
            delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
            choice["delta"] = delta
        else:
            choice["text"] = out.text
        choice["logprobs"] = self._logprobs(out.tokens, out.text)
        choice["finish_reason"] = out.finish_reason
        if self.return_token_ids:
            choice["token_ids"] = out.token_ids
        body = {**self._base(True), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, out: Output) -> dict:
        return {**self._base(True), "choices": [], "usage": usage(out)}

    async def stream(
        self, outs: AsyncIterator[Output], include_usage: bool, on_error
    ) -> AsyncIterator[str]:
        first, last = True, None
        try:
            async for out in outs:
                yield sse(self.chunk(out, first, include_usage))
                first, last = False, out
        except Exception as exc:  # headers are sent: report in-band, like OpenAI
            yield sse(on_error(exc))
            yield sse("[DONE]")
            return
        if include_usage and last is not None:
            yield sse(self.usage_chunk(last))
        yield sse("[DONE]")
