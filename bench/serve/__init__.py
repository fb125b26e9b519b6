"""``pdserve bench serve``: a load generator for OpenAI-compatible servers.

metrics.py    per-request timing and the summary (``vllm bench serve`` definitions)
datasets.py   random, ShareGPT and Mooncake-trace workloads
client.py     one streamed request -> a RequestRecord
runner.py     arrivals (Poisson/gamma or trace timestamps), concurrency cap, warmup
report.py     the table, the JSON file, the plots
cli.py        the command line (``pdserve bench serve`` / ``python -m bench.serve``)
"""
