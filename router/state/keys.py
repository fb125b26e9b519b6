"""The cluster state's Redis keys (``<p>`` = the key prefix, default ``pdserve``);
W = written by the worker's publisher (router/state/publisher.py), R = by routers::

    <p>:layout               W  KV layout JSON of the cluster (the first registration wins)
    <p>:workers              W  hash  worker_id -> record JSON (address, role, ep_size, epoch..)
    <p>:epochs               W  hash  worker_id -> epoch of the registered incarnation
    <p>:alive:<id>           W  epoch, with a TTL renewed by each heartbeat; gone = unhealthy
    <p>:load                 W  hash  worker_id -> WorkerLoad JSON (queued prefill tokens,
                                running/waiting requests, free KV blocks, queue depths)
    <p>:prefix:<id>:<epoch>  W  zset  block hash -> recency, from the engine's block-stored /
                             R  block-evicted events (routers add what they route there);
                                trimmed to the worker's block count
    <p>:seq                  WR recency counter for the prefix zsets
    <p>:refused              W  hash  worker_id -> why its registration was refused
    <p>:inflight             R  hash  worker_id -> requests routed and not finished (all routers)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def __call__(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    def alive(self, worker_id: str) -> str:
        return self("alive", worker_id)

    def prefix_index(self, worker_id: str, epoch: object) -> str:
        return self("prefix", worker_id, epoch)

    @property
    def layout(self) -> str:
        return self("layout")

    @property
    def workers(self) -> str:
        return self("workers")

    @property
    def epochs(self) -> str:
        return self("epochs")

    @property
    def load(self) -> str:
        return self("load")

    @property
    def seq(self) -> str:
        return self("seq")

    @property
    def refused(self) -> str:
        return self("refused")

    @property
    def inflight(self) -> str:
        return self("inflight")
