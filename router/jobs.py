"""Requests -> jobs: bound the input, tokenize off the event loop, check the context.

Order, cheapest first, so a hostile request costs as little as possible:

    static bounds     pydantic (router/protocol.py) while the body is parsed
    model bounds      characters of prompt text, token ids < vocab, top_k <= vocab
    constraint        response_format / structured_outputs / enforced tool call, compiled
                      (cached) in the thread pool (router/structured.py)
    tokenize          chat template + tokenizer in a thread pool (``tokenizer_threads``),
                      stopping at the context length without building the id list
    context           prompt + max_tokens <= max_model_len, min_tokens <= max_tokens

A request with ``n`` > 1 becomes ``n`` jobs with the same prompt (choice ``i`` seeded
``seed + i``); router/choices.py runs them so the prompt is computed once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor

from engine.grammar import GrammarBackend
from engine.sampling_params import MAX_SEED, SamplingParams, StructuredOutput
from engine.tokenizer import PromptTooLong, Tokenizer
from router.job import Job
from router.limits import (
    EdgeLimits,
    check_min_tokens,
    context_error,
    model_eos_ids,
    model_vocab_size,
)
from router.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from router.structured import check_compiles, resolve
from router.tools.formats import ToolFormat

Body = CompletionRequest | ChatCompletionRequest


class JobBuilder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model_dir: str,
        max_prompt_chars: int | None,
        threads: int,
        tool_format: ToolFormat | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        vocab = min(v for v in (tokenizer.vocab_size, model_vocab_size(model_dir)) if v)
        self.limits = EdgeLimits(vocab, max_prompt_chars)
        self.tool_format = tool_format
        eos = model_eos_ids(model_dir) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())  # fmt: skip
        self.grammars = GrammarBackend(model_dir, model_vocab_size(model_dir) or vocab, eos)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")

    async def completion(self, body: CompletionRequest, limit: int) -> list[Job]:
        prompt = body.prompt
        structured = await self._check_sampling(body)
        if isinstance(prompt, str):
            self.limits.check_text(len(prompt), limit, "prompt")
            ids = await self._encode(prompt, limit, True)
        else:
            if len(prompt) >= limit:
                raise context_error(limit, len(prompt), body.max_tokens)
            self.limits.check_ids(prompt, "prompt")
            ids = list(prompt)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        params = _sampling(body, body.logprobs, structured) | {"prompt_logprobs": scored}
        scoring_only = body.max_tokens == 0  # echo: one token is computed, none returned
        job = self.prepare(ids, params, body.stop, 1 if scoring_only else body.max_tokens, limit)
        job.discard_output = scoring_only
        return fan_out(job, body.n)

    async def chat(self, body: ChatCompletionRequest, limit: int) -> list[Job]:
        structured = await self._check_sampling(body)
        text = await self.render_chat(body, limit)
        ids = await self._encode(text, limit, False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.requested_max_tokens
        job = self.prepare(ids, _sampling(body, top, structured), body.stop, max_tokens, limit)
        job.request_id = "chatcmpl-" + job.request_id.removeprefix("cmpl-")
        return fan_out(job, body.n)

    async def _check_sampling(self, body: Body) -> StructuredOutput | None:
        self.limits.check_top_k(body.effective_top_k)
        self.limits.check_ids(body.stop_token_ids, "stop_token_ids")
        self.limits.check_ids([t for t, _ in body.logit_bias_items], "logit_bias")
        structured, param = resolve(body, self.tool_format)
        if structured is not None:
            await check_compiles(self.grammars, structured, param, self._pool)
        return structured

    async def _encode(self, text: str, limit: int, special: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.tokenizer.encode, text, special, limit)  # fmt: skip
        except PromptTooLong as exc:
            raise context_error(limit, exc.num_tokens, None) from None

    async def tokenize(self, text: str, limit: int, special: bool) -> list[int]:
        """Token ids of ``text`` (``/tokenize``: any length up to the prompt character
        bound, even past the context, so a client can measure its prompt)."""
        self.limits.check_text(len(text), limit, "prompt")
        return await self._encode(text, self.limits.prompt_chars(limit), special)

    async def render_chat(self, body: ChatCompletionRequest, limit: int) -> str:
        self.limits.check_text(body.num_chars(), limit, "messages")
        messages = [m.for_template() for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool,
                self.tokenizer.apply_chat_template,
                messages,
                body.add_generation_prompt,
                tools,  # fmt: skip
            )
        except Exception as exc:  # template errors come from the caller's messages
            raise ApiError(400, f"chat template failed: {exc}", param="messages") from None

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


def fan_out(job: Job, n: int) -> list[Job]:
    """``n`` choices of ``job``: distinct ids and seeds; only the first scores the prompt
    (the others then share its blocks through the prefix cache)."""
    jobs = [job]
    for i in range(1, n):
        p = job.params
        seed = None if p.seed is None else (p.seed + i) % (MAX_SEED + 1)
        params = dataclasses.replace(p, seed=seed, prompt_logprobs=None)
        jobs.append(dataclasses.replace(job, request_id=f"{job.request_id}-{i}", params=params, index=i))  # fmt: skip
    return jobs


def _sampling(body: Body, logprobs: int | None, structured: StructuredOutput | None) -> dict:
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
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "min_p": body.min_p or 0.0,
        "logit_bias": body.logit_bias_items,
        "structured": structured,
    }
