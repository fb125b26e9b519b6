"""Greedy reference outputs from Hugging Face ``transformers`` on the same checkpoint."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch


@cache
def _hf_model(model_dir: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


@cache
def _greedy(
    model_dir: str, prompt: tuple[int, ...], max_new_tokens: int, dtype: str, device: str
) -> tuple[int, ...]:
    return tuple(_generate(_hf_model(model_dir, dtype, device), prompt, max_new_tokens, device))


def _generate(model, prompt, max_new_tokens: int, device: str = "cpu", **kw) -> list[int]:
    """HF ``generate()`` greedy with EOS ignored; ``kw`` adds to its arguments."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **kw,
        )
    return out[0, len(prompt) :].tolist()


def hf_greedy(
    model_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[list[int]]:
    """HF ``generate()`` greedy continuations (EOS ignored), one prompt at a time."""
    return [list(_greedy(str(model_dir), tuple(p), max_new_tokens, dtype, device)) for p in prompts]


def make_prompts(lengths: list[int], seed: int = 0, vocab: int = 500) -> list[list[int]]:
    """Deterministic token-id prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@cache
def _top_logprobs(model_dir: str, prompt: tuple[int, ...], steps: int, k: int) -> tuple:
    model, ids, out = _hf_model(model_dir), list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            values, top = torch.topk(torch.log_softmax(logits, dim=-1), k)
            out.append(tuple(zip(top.tolist(), values.tolist(), strict=True)))
            ids.append(top[0].item())
    return tuple(out)


def hf_top_logprobs(
    model_dir: str | Path, prompt: list[int], steps: int, k: int
) -> list[list[tuple[int, float]]]:
    """Per greedy step of HF's model, the ``k`` most likely ``(token id, logprob)``, best
    first (the first is the greedy token)."""
    return [list(step) for step in _top_logprobs(str(model_dir), tuple(prompt), steps, k)]


def hf_next_logits(
    model_dir: str | Path, ids: list[int], dtype: str = "float32", device: str = "cpu"
) -> torch.Tensor:
    """HF's float32 logits for the token after ``ids``."""
    model = _hf_model(str(model_dir), dtype, device)
    with torch.inference_mode():
        return model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()


def hf_greedy_with(
    model_dir: str | Path, prompt: list[int], max_new_tokens: int, processors: list
) -> list[int]:
    """HF ``generate()`` greedy (EOS ignored) with ``processors`` (``LogitsProcessor``s,
    applied in order) as the only logits processing."""
    from transformers import LogitsProcessorList

    procs = LogitsProcessorList(processors)
    return _generate(_hf_model(str(model_dir)), prompt, max_new_tokens, logits_processor=procs)


def hf_prompt_logprobs(model_dir: str | Path, prompt: list[int]) -> torch.Tensor:
    """float32 log-softmax ``[len(prompt) - 1, vocab]``: row ``i`` scores token ``i + 1``."""
    model = _hf_model(str(model_dir))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)
