"""Parallel plumbing kept out of model code: expert parallelism (``ep``) and its step sync."""
