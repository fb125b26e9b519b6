"""``WorkerSettings``: what a worker needs besides its role, as plain values that travel as
JSON (Ray actor arguments, EP follower processes), and the ``WorkerConfig`` they build on
the worker's own node. Secrets travel as file paths only, never as values."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    RedisOptions,
    SchedulerConfig,
    StateConfig,
    TransferConfig,
    WorkerConfig,
)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs besides its role: plain values (they travel as JSON)."""

    model: str
    dtype: str = "auto"
    device: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    kv_transports: tuple[str, ...] = ("tcp", "shm")
    host: str | None = None
    """gRPC/KV bind address; ``None`` = the node's address (Ray's node IP)."""
    port: int = 0
    plane: dict[str, str] = field(default_factory=dict)
    ep_size: int = 1
    """Expert-parallel ranks serving this worker's model replica (MoE models)."""
    redis_url: str | None = None
    """Register in and publish load/prefix events to this shared cluster state."""
    heartbeat_ttl_s: float = 3.0
    """With ``redis_url``: routers drop this worker when silent this long."""
    stall_timeout_s: float = 60.0
    """Health reports the engine loop stalled after this long without an iteration."""
    redis_options: RedisOptions = field(default_factory=RedisOptions)
    """Redis password and TLS *files* on the worker's node (never a value: these settings
    travel in Ray's actor arguments)."""
    cluster_secret_file: str | None = None
    """The cluster secret's file on the worker's node (a path, never the value); ``None``:
    the node's ``$PDSERVE_CLUSTER_SECRET_FILE`` / ``$PDSERVE_CLUSTER_SECRET``."""
    cluster_auth: bool = False
    """The router authenticates its calls: a worker that finds no secret refuses to start."""

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        data = json.loads(text)
        data["kv_transports"] = tuple(data["kv_transports"])
        data["redis_options"] = RedisOptions(**data.get("redis_options", {}))
        return cls(**data)

    def worker_config(self, role: str, worker_id: str | None, host: str) -> WorkerConfig:
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=device,
            max_model_len=self.max_model_len,
            attention_backend=self.attention_backend,
            cache=CacheConfig(
                block_size=self.block_size,
                num_blocks=self.num_kv_blocks,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs
            ),
            parallel=ParallelConfig(ep_size=self.ep_size),
        )
        state = StateConfig(
            redis_url=self.redis_url, heartbeat_ttl_s=self.heartbeat_ttl_s, redis=self.redis_options
        )
        return WorkerConfig(
            role=role,
            engine=engine,
            transfer=TransferConfig(plane=dict(self.plane)),
            state=state,
            host=self.host or host,
            port=self.port,
            kv_transports=tuple(self.kv_transports),
            worker_id=worker_id,
            stall_timeout_s=self.stall_timeout_s,
            cluster_secret_file=self.cluster_secret_file,
            cluster_auth=self.cluster_auth,
        )
