"""``ServeConfig``: the root of the config tree, what ``pdserve serve`` runs: the router,
a worker config per role, how many of each, Ray, and the shared cluster state."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.fields import flag
from engine.config.router import RouterConfig
from engine.config.state import StateConfig
from engine.config.worker import WorkerConfig


@dataclass(frozen=True)
class RayConfig:
    """Where the workers run."""

    address: str | None = field(default=None, metadata=flag("--ray-address"))
    """Join this Ray cluster (default: start a local one)."""
    node_ip: str = field(default="127.0.0.2", metadata=flag("--node-ip"))
    """Node IP of a local Ray instance (keeps traffic on loopback)."""
    namespace: str | None = field(default=None, metadata=flag("--ray-namespace"))
    """Share the workers with every router naming this Ray namespace (detached actors: the
    first router starts them, the others reuse them, none stops them)."""


@dataclass(frozen=True)
class ServeConfig:
    """One ``pdserve serve``: the router in this process, workers on Ray (or standalone)."""

    router: RouterConfig
    prefill: WorkerConfig
    """Every prefill worker's config (launch names each and fills its node's values)."""
    decode: WorkerConfig
    num_prefill: int = field(default=1, metadata=flag("--prefill"))
    """Prefill workers (0 = aggregated: decode workers prefill locally)."""
    num_decode: int = field(default=1, metadata=flag("--decode"))
    """Decode workers."""
    ray: RayConfig = field(default_factory=RayConfig)
    state: StateConfig = field(default_factory=StateConfig)
    """The cluster state the router reads and every worker publishes to."""
    host: str = "127.0.0.1"
    """HTTP listen address."""
    port: int = 8000
    """HTTP port (0 = any free port)."""
    workers: tuple[str, ...] = field(default=(), metadata=flag("--worker", metavar="HOST:PORT"))
    """Use this standalone worker (repeatable); skips Ray."""
    router_only: bool = False
    """Start no workers: route to the workers registered in --redis-url."""
    cluster_secret_file: str | None = field(default=None, metadata=flag("--cluster-secret-file"))
    """Authenticate worker gRPC and the KV plane with the secret in this file (default:
    $PDSERVE_CLUSTER_SECRET_FILE, else $PDSERVE_CLUSTER_SECRET; none = unauthenticated)."""

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError(
                f"need --decode >= 1 and --prefill >= 0, got {self.num_decode}/{self.num_prefill}"
            )
        for role in ("prefill", "decode"):
            if getattr(self, role).role != role:
                raise ValueError(f"the {role} worker config has role {getattr(self, role).role!r}")
