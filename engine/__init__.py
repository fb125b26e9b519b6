"""pdserve engine: paged KV cache, continuous batching, HF checkpoint loading."""

from engine.llm import LLM, CompletionOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]
