"""``TransferConfig``: the KV transfer plane's settings (kv_transfer/ reads it; workers fill
``host`` and ``secret`` on their own node)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.fields import runtime
from engine.security import ClusterSecret


@dataclass(frozen=True)
class TransferConfig:
    """Tuning shared by every backend."""

    heartbeat_s: float = 0.5
    """Send a heartbeat when nothing was sent on a link for this long."""
    peer_timeout_s: float = 3.0
    """A link with no frame from the peer for this long is dead; its transfers fail."""
    connect_timeout_s: float = 10.0
    """Bound on connecting and pairing."""
    chunk_bytes: int | None = None
    """Data-path message / checksum granularity; None: the backend's default (1 MiB, or
    4 MiB for ucx and torch_dist, whose per-message cost is higher)."""
    reap_interval_s: float = 0.05
    """How often the receiver checks leases."""
    host: str = "127.0.0.1"
    """Interface the receiver endpoint listens on."""
    plane: dict[str, str] = field(default_factory=dict)
    """Backend-specific options (strings, see each backend)."""
    secret: ClusterSecret | None = field(default=None, metadata=runtime())
    """The cluster secret: the handshake proves it both ways and the receiver signs its
    tickets, which the sender verifies before connecting. None: unauthenticated (a laptop);
    a side with a secret refuses to pair with a side without one. A worker fills it from
    its cluster secret (read on its node); one set here is kept."""
    handshake_timeout_s: float = 5.0
    """A receiver closes a socket whose peer has not proved itself (Hello, Proof) within
    this long, however slowly it keeps sending."""
    max_pending_pairings: int = 64
    """Sockets a receiver holds before their pairing completes; more are closed at once."""
    max_pending_per_host: int = 16
    """The same bound per peer address, so one host cannot take every pending slot."""

    def __post_init__(self) -> None:
        if self.peer_timeout_s <= self.heartbeat_s:
            raise ValueError(
                f"peer_timeout_s={self.peer_timeout_s} must exceed heartbeat_s={self.heartbeat_s}; "
                "use at least 3 heartbeats"
            )
        if self.chunk_bytes is not None and self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.handshake_timeout_s <= 0:
            raise ValueError(
                f"handshake_timeout_s must be positive, got {self.handshake_timeout_s}"
            )
        if not 1 <= self.max_pending_per_host <= self.max_pending_pairings:
            raise ValueError(
                f"need 1 <= max_pending_per_host ({self.max_pending_per_host}) <= "
                f"max_pending_pairings ({self.max_pending_pairings})"
            )
