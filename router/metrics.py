"""Prometheus metrics of one router (its own registry, so several can live in a process)."""

from __future__ import annotations

from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.kv_cache.spec import KVLayoutSpec

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_HOP_BUCKETS = (0.0001, 0.00025, 0.0005, *_LATENCY_BUCKETS)
"""Hops are often well under a millisecond."""
HOPS = ("reserve", "prefill_queue", "prefill_compute", "transfer_tail", "decode_admission")
"""The ``hop`` labels of ``pdserve_disagg_hop_seconds``."""


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # Registered in this order (the order /metrics lists them in).
        self._request_metrics(r)
        self._routing_metrics(r)
        self._worker_metrics(r)
        self._transfer_metrics(r)
        self._cluster_metrics(r)
        self._moe_metrics(r)

    def _request_metrics(self, r: CollectorRegistry) -> None:
        """Latency and token counts of the requests themselves."""
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Time between consecutive output tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "pdserve_requests", "Finished requests by outcome.", ["outcome"], registry=r
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens.", registry=r)
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Generated tokens.", registry=r
        )

    def _routing_metrics(self, r: CollectorRegistry) -> None:
        """Routing decisions and the router's own load."""
        self.routing = Counter(
            "pdserve_routing_decisions",
            "Routing decisions by path (remote/local) and reason (fallbacks included).",
            ["path", "reason"],
            registry=r,
        )
        self.inflight = Gauge("pdserve_router_inflight_requests", "Requests in flight.", registry=r)

    def _worker_metrics(self, r: CollectorRegistry) -> None:
        """Each worker's queues and KV pool (from its Stats)."""
        self.queue_depth = Gauge(
            "pdserve_worker_queue_depth",
            "Requests in each worker queue (from the worker's Stats).",
            ["worker", "queue"],
            registry=r,
        )
        self.kv_blocks_in_use = Gauge(
            "pdserve_kv_blocks_in_use", "KV blocks in use per worker.", ["worker"], registry=r
        )
        self.kv_blocks_total = Gauge(
            "pdserve_kv_blocks_total", "KV blocks per worker.", ["worker"], registry=r
        )
        self.kv_pool_tokens = Gauge(
            "pdserve_kv_pool_tokens", "Tokens the KV pool of each worker holds (blocks x block size).",
            ["worker"], registry=r,
        )  # fmt: skip
        self.kv_bytes_per_token = Gauge(
            "pdserve_kv_bytes_per_token",
            "KV bytes per token of each worker's cache (all layers, K and V, scales included: "
            "half of bf16's for --kv-cache-dtype fp8/int8).",
            ["worker"], registry=r,
        )  # fmt: skip

    def _transfer_metrics(self, r: CollectorRegistry) -> None:
        """KV moved from prefill to decode, and each hop of a disaggregated request."""
        self.kv_bytes = Counter(
            "pdserve_kv_transfer_bytes", "KV bytes moved from prefill to decode.", registry=r
        )
        self.kv_seconds = Counter(
            "pdserve_kv_transfer_seconds",
            "Seconds spent moving KV (the decode worker's first page to every layer in).",
            registry=r,
        )  # fmt: skip
        self.hops = Histogram(
            "pdserve_disagg_hop_seconds",
            "Seconds of each hop of a disaggregated request: reserve (the Reserve rpc, "
            "router), prefill_queue and prefill_compute (the prefill worker, until it "
            "sampled the first token), transfer_tail (from the prefill's last layer until "
            "the decode worker had every layer) and decode_admission (KV and Decode call "
            "in, to the running batch).",
            ["hop"], buckets=_HOP_BUCKETS, registry=r,
        )  # fmt: skip

    def _cluster_metrics(self, r: CollectorRegistry) -> None:
        """The registered workers and the shared cluster state."""
        self.workers = Gauge(
            "pdserve_workers", "Registered workers by role and health.", ["role", "healthy"],
            registry=r,
        )  # fmt: skip
        self.state_connected = Gauge(
            "pdserve_cluster_state_connected",
            "1 while the shared cluster state (Redis) is reachable; 0 = serving on the last known state.",
            registry=r,
        )  # fmt: skip
        self.state_connected.set(1)
        self.reservation_conflicts = Counter(
            "pdserve_route_reservation_conflicts",
            "Routing decisions retried because another router took the worker first.",
            registry=r,
        )  # fmt: skip

    def _moe_metrics(self, r: CollectorRegistry) -> None:
        """MoE expert load (expert-parallel workers)."""
        self.expert_tokens = Gauge(
            "pdserve_expert_tokens", "MoE (token, expert) assignments since the worker started.",
            ["worker", "rank", "expert"], registry=r,
        )  # fmt: skip
        self.rank_tokens = Gauge(
            "pdserve_expert_rank_tokens", "MoE (token, expert) assignments per EP rank.",
            ["worker", "rank"], registry=r,
        )  # fmt: skip
        self.expert_balancedness = Gauge(
            "pdserve_expert_balancedness", "MoE load balance, mean/max tokens (1 = even).",
            ["worker", "level"], registry=r,
        )  # fmt: skip

    def route(self, path: Enum, reason: Enum) -> None:
        """One decision (router/policy.py ``RoutePath`` / ``RouteReason``: the label values
        are their string values)."""
        self.routing.labels(path=path.value, reason=reason.value).inc()

    def worker_stats(self, worker_id: str, num_blocks: int, free: int, queues: dict) -> None:
        self.kv_blocks_in_use.labels(worker=worker_id).set(num_blocks - free)
        self.kv_blocks_total.labels(worker=worker_id).set(num_blocks)
        for name, depth in queues.items():
            self.queue_depth.labels(worker=worker_id, queue=name).set(depth)

    def kv_pool(self, worker_id: str, num_blocks: int, layout: KVLayoutSpec) -> None:
        """The pool in tokens and bytes per token, for the worker's KV dtype."""
        self.kv_pool_tokens.labels(worker=worker_id).set(num_blocks * layout.block_size)
        self.kv_bytes_per_token.labels(worker=worker_id).set(layout.bytes_per_token)

    def expert_stats(self, worker_id: str, tokens: list[int], ep_size: int) -> None:
        """Per expert and per EP rank: tokens routed, and balancedness (mean / max)."""
        per = len(tokens) // max(ep_size, 1)
        ranks = [sum(tokens[r * per : (r + 1) * per]) for r in range(ep_size)]
        for e, n in enumerate(tokens):
            self.expert_tokens.labels(worker=worker_id, rank=str(e // per), expert=str(e)).set(n)
        for r, n in enumerate(ranks):
            self.rank_tokens.labels(worker=worker_id, rank=str(r)).set(n)
        for level, counts in (("expert", tokens), ("rank", ranks)):
            top = max(counts)
            value = sum(counts) / len(counts) / top if top else 1.0
            self.expert_balancedness.labels(worker=worker_id, level=level).set(value)

    def forget_worker(self, worker_id: str) -> None:
        gauges = (self.kv_blocks_in_use, self.kv_blocks_total, self.kv_pool_tokens, self.kv_bytes_per_token)  # fmt: skip
        for gauge in gauges:
            try:
                gauge.remove(worker_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
