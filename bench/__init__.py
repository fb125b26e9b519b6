"""Benchmark scripts. Each prints a JSON object as its last line."""
