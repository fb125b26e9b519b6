"""Credentials on the command line: the cluster secret and the Redis password come from
*files* (a flag value would show in ``ps``); README, Security.

    --api-key-file PATH     else --api-key KEY (with a warning), else $PDSERVE_API_KEY
    --cluster-secret-file   else $PDSERVE_CLUSTER_SECRET_FILE, else $PDSERVE_CLUSTER_SECRET
    --redis-password-file   else $PDSERVE_REDIS_PASSWORD_FILE, else $PDSERVE_REDIS_PASSWORD
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from engine.config import StateConfig
from engine.security import ClusterSecret, load_cluster_secret
from router.state.redis_conn import ENV_PASSWORD_FILE, redact_url

logger = logging.getLogger("pdserve")


def api_key(key_file: str | None, key: str | None) -> str | None:
    """``--api-key-file``, else ``--api-key`` (with a warning: ps shows it), else the
    ``PDSERVE_API_KEY`` environment variable."""
    if key_file and key:
        raise ValueError("give --api-key-file or --api-key, not both")
    if key_file:
        try:
            value = open(key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
        if not value:
            raise ValueError(f"--api-key-file {key_file} is empty")
        return value
    if key:
        logger.warning("--api-key is visible to every user of this host (ps, /proc); use --api-key-file or PDSERVE_API_KEY")  # fmt: skip
        return key
    return os.environ.get("PDSERVE_API_KEY") or None


def warn_password_in_url(state: StateConfig) -> None:
    """The URL itself carries the password: ``ps`` shows it, and ``pdserve serve`` hands the
    URL to its Ray workers as an actor argument. It works; say how to do better."""
    if state.redis_url and urlsplit(state.redis_url).password:
        logger.warning(
            "the Redis URL %s carries a password, visible to `ps` and in the Ray workers' "
            "arguments: use --redis-password-file (or $%s) instead",
            redact_url(state.redis_url), ENV_PASSWORD_FILE,
        )  # fmt: skip


def cluster_secret(path: str | None) -> ClusterSecret | None:
    return load_cluster_secret(path)
