"""The prefill worker: batch prompts, compute their KV, stream it layer by layer to decode."""
