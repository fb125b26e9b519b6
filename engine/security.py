"""The cluster secret: what authenticates the internal planes (gRPC, the KV handshake,
transfer tickets) between the router and the workers.

Where it comes from, first match wins (never a command-line value, which ``ps`` shows):

1. ``--cluster-secret-file PATH`` (the chart mounts a Kubernetes Secret there);
2. ``$PDSERVE_CLUSTER_SECRET_FILE``;
3. ``$PDSERVE_CLUSTER_SECRET`` (the value itself).

None of them set means the planes are unauthenticated (a laptop). The secret itself never
crosses the wire: peers prove they know it with HMAC-SHA256 over what they send.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_VALUE = "PDSERVE_CLUSTER_SECRET"
ENV_FILE = "PDSERVE_CLUSTER_SECRET_FILE"
MIN_SECRET_BYTES = 16
"""Shorter secrets are refused: they can be guessed offline from one captured MAC."""


@dataclass(frozen=True)
class ClusterSecret:
    """A shared key; :meth:`sign` and :meth:`verify` are HMAC-SHA256 over ``parts``."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"cluster secret is {len(self.key)} bytes; use at least {MIN_SECRET_BYTES} "
                "(e.g. `openssl rand -hex 32 > secret`)"
            )

    def sign(self, *parts: bytes | str) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode() if isinstance(part, str) else bytes(part)
            mac.update(len(data).to_bytes(8, "big"))  # unambiguous framing of the parts
            mac.update(data)
        return mac.digest()

    def verify(self, mac: bytes, *parts: bytes | str) -> bool:
        return hmac.compare_digest(self.sign(*parts), bytes(mac))

    def __repr__(self) -> str:
        return "ClusterSecret(<redacted>)"


def load_cluster_secret(
    path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
) -> ClusterSecret | None:
    """The secret from ``path``, else the environment (see the module docstring)."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_FILE) or None
    if path is not None:
        try:
            raw = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the cluster secret file {path}: {exc}") from None
        if not raw:
            raise ValueError(f"the cluster secret file {path} is empty")
        return ClusterSecret(raw)
    value = env.get(ENV_VALUE)
    return ClusterSecret(value.strip().encode()) if value else None
