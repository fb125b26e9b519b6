"""Routing policies: pick a decode worker, and a prefill worker or local prefill.

``CostPolicy`` is load- and prefix-aware (in the spirit of Dynamo's KV router)::

    decode cost(D)  = prompt tokens not cached on D        (prefix index, chained hashes)
                    + prefill tokens queued on D            (its Stats)
                    + decode_load_weight * requests on D    (running + routed in flight)
    prefill cost(P) = prefill tokens queued on P + prompt tokens routed to P in flight

Conditional disaggregation then prefills on D itself when no prefill worker is healthy,
or when the uncached part of the prompt is at most ``local_prefill_tokens``. Every
decision carries a path (``remote``/``local``) and a reason, which the router counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from router.cluster import ClusterState, WorkerRecord

Path = Literal["remote", "local"]


class NoWorkerError(RuntimeError):
    """No healthy decode worker: the router answers 503."""


@dataclass(frozen=True)
class RouteRequest:
    prompt_len: int
    block_hashes: list[int]
    """Chained hashes of the prompt's full blocks (engine.kv_cache.hashing)."""


@dataclass(frozen=True)
class RouteDecision:
    decode: WorkerRecord
    prefill: WorkerRecord | None
    path: Path
    reason: str
    cached_blocks: int
    """Leading prompt blocks the prefix index believes ``decode`` holds."""


class RoutingPolicy(Protocol):
    def route(self, request: RouteRequest, state: ClusterState) -> RouteDecision:
        """Choose the workers for one request; raises :class:`NoWorkerError`."""


class CostPolicy:
    """See the module docstring."""

    def __init__(self, local_prefill_tokens: int = 0, decode_load_weight: float = 16.0) -> None:
        self.local_prefill_tokens = local_prefill_tokens
        self.decode_load_weight = decode_load_weight

    def decode_cost(self, request: RouteRequest, w: WorkerRecord, state: ClusterState) -> float:
        cached = state.match_prefix(w.worker_id, request.block_hashes) * w.layout.block_size
        uncached = max(0, request.prompt_len - cached)
        load = w.load.num_running + w.load.num_waiting + w.inflight
        return uncached + w.load.queued_prefill_tokens + self.decode_load_weight * load

    def route(self, request: RouteRequest, state: ClusterState) -> RouteDecision:
        decodes = state.workers("decode")
        if not decodes:
            raise NoWorkerError("no healthy decode worker")
        costs = {w.worker_id: self.decode_cost(request, w, state) for w in decodes}
        d = min(decodes, key=lambda w: (costs[w.worker_id], w.worker_id))
        cached = state.match_prefix(d.worker_id, request.block_hashes)
        uncached = request.prompt_len - cached * d.layout.block_size

        def local(reason: str) -> RouteDecision:
            return RouteDecision(d, None, "local", reason, cached)

        prefills = state.workers("prefill")
        if not prefills:
            registered = state.workers("prefill", healthy_only=False)
            return local("no_prefill_worker" if registered else "aggregated")
        if uncached <= self.local_prefill_tokens:
            return local("prefix_cached" if cached else "short_prompt")
        p = min(prefills, key=lambda w: (w.load.queued_prefill_tokens + w.inflight, w.worker_id))
        return RouteDecision(d, p, "remote", "cost", cached)
