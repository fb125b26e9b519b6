"""The security flags ``pdserve serve`` and ``pdserve worker`` share: the cluster secret and
the Redis credentials, each a *file* (a flag value would show in ``ps``); README, Security."""

from __future__ import annotations

import argparse
import logging
import os
from urllib.parse import urlsplit

from engine.security import ENV_FILE, ENV_VALUE, ClusterSecret, load_cluster_secret
from router.state.redis_conn import ENV_PASSWORD, ENV_PASSWORD_FILE, RedisOptions, redact_url

logger = logging.getLogger("pdserve")


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-secret-file",
        default=None,
        metavar="PATH",
        help="authenticate worker gRPC and the KV plane with the secret in this file "
        f"(default: ${ENV_FILE}, else ${ENV_VALUE}; none = unauthenticated)",
    )
    p.add_argument(
        "--redis-password-file",
        default=None,
        metavar="PATH",
        help=f"Redis password from this file (default: ${ENV_PASSWORD_FILE}, else ${ENV_PASSWORD})",
    )
    p.add_argument("--redis-ca-file", default=None, metavar="PATH", help="rediss://: CA bundle that signs the server's certificate")  # fmt: skip
    p.add_argument("--redis-cert-file", default=None, metavar="PATH", help="rediss://: client certificate (PEM)")  # fmt: skip
    p.add_argument("--redis-key-file", default=None, metavar="PATH", help="rediss://: client key (PEM)")  # fmt: skip


def warn_password_in_url(args: argparse.Namespace) -> None:
    """The URL itself carries the password: ``ps`` shows it, and ``pdserve serve`` hands the
    URL to its Ray workers as an actor argument. It works; say how to do better."""
    if args.redis_url and urlsplit(args.redis_url).password:
        logger.warning(
            "the Redis URL %s carries a password, visible to `ps` and in the Ray workers' "
            "arguments: use --redis-password-file (or $%s) instead",
            redact_url(args.redis_url), ENV_PASSWORD_FILE,
        )  # fmt: skip


def redis_options(args: argparse.Namespace) -> RedisOptions:
    return RedisOptions(
        password_file=args.redis_password_file,
        ca_file=args.redis_ca_file,
        cert_file=args.redis_cert_file,
        key_file=args.redis_key_file,
    )


def secret_file(args: argparse.Namespace) -> str | None:
    """The secret's path to hand to workers (a path travels; the value never does)."""
    return args.cluster_secret_file or os.environ.get(ENV_FILE) or None


def cluster_secret(args: argparse.Namespace) -> ClusterSecret | None:
    return load_cluster_secret(args.cluster_secret_file)
