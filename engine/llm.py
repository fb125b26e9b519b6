"""Offline generation: ``LLM(model_dir).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.config import EngineConfig
from engine.config.tree import with_leaves
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    """Why this prompt failed alone (``finish_reason == "error"``); the others are unaffected."""
    prompt_logprobs: list[dict[int, float]] | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token after the first."""


class LLM:
    """Runs an :class:`LLMEngine` to completion over a batch of prompts."""

    def __init__(
        self, model: str | Path | EngineConfig, *, ep=None, parallel=None, **overrides
    ) -> None:
        """``model``: a checkpoint directory (``overrides`` then name EngineConfig leaves by
        field or flag name: ``block_size=16``, ``num_kv_blocks=8``, ``device="cuda"``), or
        a whole :class:`~engine.config.EngineConfig`. ``parallel``: this rank's
        :class:`~engine.parallel.state.ParallelState` (``ep``: an
        :class:`~engine.parallel.ep.ExpertParallelGroup`, the same for EP); the leader
        (rank 0) generates, followers call ``llm.engine.run_follower()``."""
        if isinstance(model, EngineConfig):
            config = replace(model, **overrides) if overrides else model
        else:
            config = with_leaves(EngineConfig, model=str(model), **overrides)
        self.engine = LLMEngine(config, parallel if parallel is not None else ep)
        path = Path(config.model)
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        self._ids = itertools.count()

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for every prompt (text or token ids); outputs keep the input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        outputs: dict[str, CompletionOutput] = {}
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                rid = f"offline-{next(self._ids)}"
                ids = self._tokenize(prompt)
                self.engine.add_request(rid, ids, p)
                outputs[rid] = CompletionOutput(rid, ids)
            self._run(outputs)
        except BaseException:
            for rid in outputs:
                self.engine.abort(rid)
            raise
        return list(outputs.values())

    def _run(self, outputs: dict[str, CompletionOutput]) -> None:
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                done = outputs[out.request_id]
                done.token_ids.extend(out.new_token_ids)
                done.logprobs.extend(out.new_logprobs)
                done.num_cached_tokens = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    done.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    done.finish_reason, done.error = out.finish_reason, out.error
        if self.tokenizer is not None:
            for out in outputs.values():
                out.text = self.tokenizer.decode(out.token_ids)
