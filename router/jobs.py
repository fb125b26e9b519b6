"""Requests -> jobs: bound the input, tokenize off the event loop, check the context.

Order, cheapest first, so a hostile request costs as little as possible:

    static bounds     pydantic (router/protocol.py) while the body is parsed
    model bounds      characters of prompt text, token ids < vocab, top_k <= vocab
    tokenize          chat template + tokenizer in a thread pool (``tokenizer_threads``),
                      stopping at the context length without building the id list
    context           prompt + max_tokens <= max_model_len, min_tokens <= max_tokens
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

from engine.sampling_params import SamplingParams
from engine.tokenizer import PromptTooLong, Tokenizer
from router.job import Job
from router.limits import EdgeLimits, check_min_tokens, context_error, model_vocab_size
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest

Body = CompletionRequest | ChatCompletionRequest


class JobBuilder:
    def __init__(
        self, tokenizer: Tokenizer, model_dir: str, max_prompt_chars: int | None, threads: int
    ) -> None:
        self.tokenizer = tokenizer
        vocab = min(v for v in (tokenizer.vocab_size, model_vocab_size(model_dir)) if v)
        self.limits = EdgeLimits(vocab, max_prompt_chars)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")

    async def completion(self, body: CompletionRequest, limit: int) -> Job:
        prompt = body.prompt
        self._check_sampling(body)
        if isinstance(prompt, str):
            self.limits.check_text(len(prompt), limit, "prompt")
            ids = await self._encode(prompt, limit, True)
        else:
            if len(prompt) >= limit:
                raise context_error(limit, len(prompt), body.max_tokens)
            self.limits.check_ids(prompt, "prompt")
            ids = list(prompt)
        return self.prepare(ids, _sampling(body, body.logprobs), body.stop, body.max_tokens, limit)

    async def chat(self, body: ChatCompletionRequest, limit: int) -> Job:
        self._check_sampling(body)
        self.limits.check_text(body.num_chars(), limit, "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(
                self._pool, self.tokenizer.apply_chat_template, messages, body.add_generation_prompt
            )
        except Exception as exc:  # template errors come from the caller's messages
            raise ApiError(400, f"chat template failed: {exc}", param="messages") from None
        ids = await self._encode(text, limit, False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.requested_max_tokens
        job = self.prepare(ids, _sampling(body, top), body.stop, max_tokens, limit)
        job.request_id = "chatcmpl-" + job.request_id.removeprefix("cmpl-")
        return job

    def _check_sampling(self, body: Body) -> None:
        self.limits.check_top_k(body.effective_top_k)
        self.limits.check_ids(body.stop_token_ids, "stop_token_ids")

    async def _encode(self, text: str, limit: int, special: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.tokenizer.encode, text, special, limit)  # fmt: skip
        except PromptTooLong as exc:
            raise context_error(limit, exc.num_tokens, None) from None

    def prepare(
        self, prompt: list[int], params: dict, stop: list[str], max_tokens: int | None, limit: int
    ) -> Job:
        """Check the prompt against the context limit and build the job (ApiError 400)."""
        n = len(prompt)
        room = limit - n
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise context_error(limit, n, max_tokens)
        max_tokens = max_tokens or room
        check_min_tokens(params["min_tokens"], max_tokens)
        try:
            sp = SamplingParams(**params, max_tokens=max_tokens)
        except ValueError as exc:  # a backstop: the checks above should refuse it first
            raise ApiError(400, str(exc)) from None
        return Job(f"cmpl-{uuid.uuid4().hex[:16]}", prompt, sp, stop)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _sampling(body: Body, logprobs: int | None) -> dict:
    """Engine SamplingParams fields from a request (OpenAI defaults where unset)."""
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.effective_top_k,
        "seed": body.seed,
        "stop_token_ids": tuple(body.stop_token_ids),
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "logprobs": logprobs,
    }
