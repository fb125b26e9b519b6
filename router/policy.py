"""Routing policies: pick a decode worker, and a prefill worker or local prefill.

``CostPolicy`` is load- and prefix-aware (in the spirit of Dynamo's KV router)::

    decode cost(D)  = prompt tokens not cached on D        (prefix index, chained hashes)
                    + prefill tokens queued on D            (its Stats)
                    + decode_load_weight * requests on D    (running + routed in flight)

Conditional disaggregation then prefills on D itself when no prefill worker is healthy,
when the uncached part of the prompt is at most ``local_prefill_tokens``, or when prefill
is overloaded: the predicted time to first token (TTFT) of remote prefill exceeds
``overload_factor`` times that of local prefill on D::

    TTFT remote(P) = (tokens queued on P + uncached) / rate(P) + transfer(P -> D) / layers
    TTFT local(D)  = (tokens queued on D + uncached) / rate(D)

``rate`` is each worker's measured prompt tokens per second (Stats); an unmeasured worker
is assumed as fast as the other side. Transfers overlap compute layer by layer, so only
about one layer's share of the transfer, at the pair's measured bandwidth, is exposed.
The factor (default 8; 0 turns the check off) is how much TTFT may grow to keep prefill
off D's decode batch. The prefill worker with the lowest predicted TTFT wins (ties: fewer
requests routed to it in flight). Every decision carries a
path (``remote``/``local``) and a reason, which the router counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from router.state.base import ClusterReader, WorkerRecord


class RoutePath(str, Enum):
    """Where a request prefills (the ``path`` label of ``pdserve_routing_decisions``)."""

    REMOTE = "remote"
    LOCAL = "local"


class RouteReason(str, Enum):
    """Why (the ``reason`` label): the policy's choices, then the router's fallbacks."""

    COST = "cost"
    AGGREGATED = "aggregated"
    NO_PREFILL_WORKER = "no_prefill_worker"
    PREFIX_CACHED = "prefix_cached"
    SHORT_PROMPT = "short_prompt"
    PREFILL_OVERLOADED = "prefill_overloaded"
    RESERVE_FAILED = "reserve_failed"
    PREFILL_TIMEOUT = "prefill_timeout"
    TRANSFER_FAILED = "transfer_failed"
    LAYOUT_MISMATCH = "layout_mismatch"
    TICKET_REFUSED = "ticket_refused"
    PREFILL_FAILED = "prefill_failed"


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
    path: RoutePath
    reason: RouteReason
    cached_blocks: int
    """Leading prompt blocks the prefix index believes ``decode`` holds."""


class RoutingPolicy(Protocol):
    def route(self, request: RouteRequest, state: ClusterReader) -> RouteDecision:
        """Choose the workers for one request; raises :class:`NoWorkerError`."""

    def observe_transfer(
        self, prefill_id: str, decode_id: str, nbytes: int, seconds: float
    ) -> None:
        """A remote prefill finished: its KV stream moved ``nbytes`` in ``seconds``."""


class CostPolicy:
    """See the module docstring."""

    def __init__(
        self,
        local_prefill_tokens: int = 0,
        decode_load_weight: float = 16.0,
        overload_factor: float = 8.0,
    ) -> None:
        self.local_prefill_tokens = local_prefill_tokens
        self.decode_load_weight = decode_load_weight
        self.overload_factor = overload_factor
        self._bandwidth: dict[tuple[str, str], float] = {}
        """(prefill id, decode id) -> measured KV transfer bytes per second (moving average)."""

    def observe_transfer(
        self, prefill_id: str, decode_id: str, nbytes: int, seconds: float
    ) -> None:
        """Fold one finished transfer into the pair's bandwidth estimate."""
        if nbytes <= 0 or seconds <= 0:
            return
        key, bw = (prefill_id, decode_id), nbytes / seconds
        old = self._bandwidth.get(key)
        self._bandwidth[key] = bw if old is None else old + 0.3 * (bw - old)

    def decode_cost(self, request: RouteRequest, w: WorkerRecord, state: ClusterReader) -> float:
        cached = state.match_prefix(w.worker_id, request.block_hashes) * w.layout.block_size
        uncached = max(0, request.prompt_len - cached)
        load = w.load.num_running + w.load.num_waiting + w.inflight
        return uncached + w.load.queued_prefill_tokens + self.decode_load_weight * load

    def route(self, request: RouteRequest, state: ClusterReader) -> RouteDecision:
        decodes = state.workers("decode")
        if not decodes:
            raise NoWorkerError("no healthy decode worker")
        costs = {w.worker_id: self.decode_cost(request, w, state) for w in decodes}
        d = min(decodes, key=lambda w: (costs[w.worker_id], w.worker_id))
        cached = state.match_prefix(d.worker_id, request.block_hashes)
        uncached = request.prompt_len - cached * d.layout.block_size

        def local(reason: RouteReason) -> RouteDecision:
            return RouteDecision(d, None, RoutePath.LOCAL, reason, cached)

        prefills = state.workers("prefill")
        if not prefills:
            registered = state.workers("prefill", healthy_only=False)
            return local(RouteReason.NO_PREFILL_WORKER if registered else RouteReason.AGGREGATED)
        if uncached <= self.local_prefill_tokens:
            return local(RouteReason.PREFIX_CACHED if cached else RouteReason.SHORT_PROMPT)
        ttft = {p.worker_id: self.remote_ttft(p, d, uncached) for p in prefills}
        p = min(prefills, key=lambda w: (ttft[w.worker_id], w.inflight, w.worker_id))
        limit = self.overload_factor * self.local_ttft(d, p, uncached)
        if self.overload_factor > 0 and ttft[p.worker_id] > limit:
            return local(RouteReason.PREFILL_OVERLOADED)
        return RouteDecision(d, p, RoutePath.REMOTE, RouteReason.COST, cached)

    def remote_ttft(self, p: WorkerRecord, d: WorkerRecord, uncached: int) -> float:
        """Predicted seconds to first token when ``p`` prefills for ``d``."""
        compute = (p.load.queued_prefill_tokens + uncached) / _rate(p, d)
        bw = self._bandwidth.get((p.worker_id, d.worker_id))
        if bw is None:
            return compute
        layout = d.layout
        tokens = -(-uncached // layout.block_size) * layout.block_size  # whole blocks move
        return compute + tokens * layout.bytes_per_token / bw / layout.num_layers

    def local_ttft(self, d: WorkerRecord, p: WorkerRecord, uncached: int) -> float:
        """Predicted seconds to first token when ``d`` prefills the prompt itself."""
        return (d.load.queued_prefill_tokens + uncached) / _rate(d, p)


def _rate(w: WorkerRecord, other: WorkerRecord) -> float:
    """``w``'s measured prefill rate, else ``other``'s, else 1 (then TTFTs are in tokens)."""
    return w.load.prefill_tokens_per_s or other.load.prefill_tokens_per_s or 1.0
