"""Drive a workload against a server: arrivals, a concurrency cap, warmup, progress.

warmup     N requests (the first N prompts reversed: same lengths, no shared prefix
           with the measured prompts), concurrently, not recorded
schedule   trace timestamps when the dataset has them, else gamma-distributed gaps
           with mean 1/rate (burstiness 1 = Poisson; rate inf = all at once)
send       each request at its time; with --max-concurrency it may wait for a slot,
           and its clock starts when it is sent (as vllm bench serve)
summary    metrics over every request, duration = first send to last completion
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.serve.client import ClientConfig, send
from bench.serve.datasets import BenchRequest
from bench.serve.metrics import RequestRecord, summarize

logger = logging.getLogger("bench.serve")


@dataclass(frozen=True)
class RunConfig:
    request_rate: float = math.inf
    """Requests per second; ``inf`` sends everything at once."""
    burstiness: float = 1.0
    """Gamma shape of the gaps: 1 = Poisson, < 1 burstier, > 1 more even."""
    max_concurrency: int | None = None
    seed: int = 0
    warmup: int = 0
    goodput: dict[str, float] = field(default_factory=dict)
    """SLOs in ms by metric (``ttft``, ``tpot``, ``e2el``)."""
    request_timeout_s: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")


@dataclass
class BenchResult:
    summary: dict[str, Any]
    records: list[RequestRecord]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        records = [{**asdict(r), "tpot": r.tpot} for r in self.records]
        return {"config": self.config, "summary": self.summary, "records": records}


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times after the start: the first at 0, then gaps ~ Gamma(b, 1 / (rate * b))."""
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def schedule(requests: list[BenchRequest], cfg: RunConfig) -> list[float]:
    if requests and all(r.arrival_s is not None for r in requests):
        return [float(r.arrival_s) for r in requests]
    return arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)


def _http(cfg: RunConfig) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        return None
    return tqdm(total=total, disable=not enabled, desc="requests", file=sys.stderr)


async def warm_up(http: httpx.AsyncClient, client: ClientConfig, reqs: list[BenchRequest]) -> None:
    """Send reversed copies of ``reqs``; raise if every one of them fails."""
    if not reqs:
        return
    logger.info("warming up with %d request(s)", len(reqs))
    warm = [BenchRequest(r.prompt[::-1], r.prompt_len, r.output_len) for r in reqs]
    t0 = time.perf_counter()
    records = await asyncio.gather(*(send(http, client, r, i, t0) for i, r in enumerate(warm)))
    if not any(r.success for r in records):
        raise RuntimeError(f"warmup failed; check the server and arguments: {records[0].error}")


async def run(client: ClientConfig, cfg: RunConfig, requests: list[BenchRequest]) -> BenchResult:
    """Run the workload (see the module docstring) and summarize it."""
    offsets = schedule(requests, cfg)
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = _progress(len(requests), cfg.progress)
    async with _http(cfg) as http:
        await warm_up(http, client, requests[: cfg.warmup])

        async def one(i: int, t0: float) -> RequestRecord:
            if slots is None:
                rec = await send(http, client, requests[i], i, t0)
            else:
                async with slots:
                    rec = await send(http, client, requests[i], i, t0)
            if bar is not None:
                bar.update(1)
            return rec

        tasks = []
        t0 = time.perf_counter()
        for i in sorted(range(len(requests)), key=offsets.__getitem__):
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, t0)))
        records = sorted(await asyncio.gather(*tasks), key=lambda r: r.index)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    summary = summarize(records, duration, cfg.goodput)
    config = {**asdict(client), **asdict(cfg), "num_prompts": len(requests)}
    config.pop("api_key", None)
    config["request_rate"] = str(cfg.request_rate) if math.isinf(cfg.request_rate) else cfg.request_rate  # fmt: skip
    if requests and all(r.arrival_s is not None for r in requests):
        config["request_rate"] = "trace timestamps"
    return BenchResult(summary, records, config)
