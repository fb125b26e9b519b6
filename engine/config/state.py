"""``StateConfig``: where the shared cluster state lives (``--redis-url``) and how routers
and workers' publishers reach it. Credentials are *file paths* only, never a secret value,
so the config travels to Ray actors and processes as it is (router/state/redis_conn.py
reads the files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.fields import flag


@dataclass(frozen=True)
class RedisOptions:
    """Credentials and TLS for the Redis connection (files on each node)."""

    password_file: str | None = field(default=None, metadata=flag("--redis-password-file"))
    """Redis password from this file (default: $PDSERVE_REDIS_PASSWORD_FILE, else
    $PDSERVE_REDIS_PASSWORD)."""
    ca_file: str | None = field(default=None, metadata=flag("--redis-ca-file"))
    """rediss://: CA bundle that signs the server's certificate."""
    cert_file: str | None = field(default=None, metadata=flag("--redis-cert-file"))
    """rediss://: client certificate (PEM), with --redis-key-file."""
    key_file: str | None = field(default=None, metadata=flag("--redis-key-file"))
    """rediss://: the client certificate's private key (PEM)."""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--redis-cert-file and --redis-key-file go together; pass both")


@dataclass(frozen=True)
class StateConfig:
    """The shared cluster state (routers read it, workers' publishers write it)."""

    redis_url: str | None = None
    """Share routing state (workers, load, prefix index) in this Redis, e.g.
    redis://127.0.0.1:6379/0; workers register and publish there (default: in memory,
    one router)."""
    heartbeat_ttl_s: float = field(default=3.0, metadata=flag("--heartbeat-ttl"))
    """With --redis-url: seconds a silent worker stays in the routers' candidate set."""
    prefix: str = field(default="pdserve", metadata=flag(None))
    """Key prefix of every Redis key (router/state/keys.py)."""
    redis: RedisOptions = field(default_factory=RedisOptions)

    def __post_init__(self) -> None:
        if not self.heartbeat_ttl_s > 0:
            raise ValueError(f"heartbeat_ttl_s must be > 0 seconds, got {self.heartbeat_ttl_s}")
