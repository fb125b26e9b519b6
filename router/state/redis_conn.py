"""Connecting to the cluster state's Redis without showing its credentials anywhere.

The password, first match wins (a file is what a Kubernetes Secret mounts; a flag value
would show in ``ps``, so there is none):

1. ``--redis-password-file PATH`` (``RedisOptions.password_file``);
2. ``$PDSERVE_REDIS_PASSWORD_FILE``;
3. ``$PDSERVE_REDIS_PASSWORD`` (the value);
4. the URL's own (``redis://[user]:PASSWORD@host:6379/0``): it works, but then the URL is a
   secret, in every process list and config it passes through.

A username (Redis ACL) stays in the URL: ``redis://pdserve@host:6379/0``. TLS is a
``rediss://`` URL, verified against the system's CAs or ``--redis-ca-file``;
``--redis-cert-file`` / ``--redis-key-file`` add a client certificate (for a server with
``tls-auth-clients yes``).

Whatever shows a URL (``/health``, logs, errors) shows :func:`redact_url` of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from engine.config import RedisOptions

ENV_PASSWORD = "PDSERVE_REDIS_PASSWORD"
ENV_PASSWORD_FILE = "PDSERVE_REDIS_PASSWORD_FILE"
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pass|pwd|token|secret)[^=&]*=)[^&]*")


def redact_url(url: str) -> str:
    """``url`` with its password (and any password-like query value) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rsplit("@", 1)[1]
            netloc = f"{user}:***@{host}"
        out = urlunsplit(parts._replace(netloc=netloc)) if netloc != parts.netloc else url
    except ValueError:  # not parseable: show nothing that could be a credential
        return "<unparseable redis url>"
    return _SECRET_QUERY.sub(r"\1***", out)


def _read(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from None
    if not value:
        raise ValueError(f"the {what} file {path} is empty")
    return value


def password(options: RedisOptions, env: Mapping[str, str] | None = None) -> str | None:
    """The Redis password from ``options``' file or the environment (module docstring)."""
    env = os.environ if env is None else env
    path = options.password_file or env.get(ENV_PASSWORD_FILE)
    if path:
        return _read(path, "Redis password")
    return env.get(ENV_PASSWORD) or None


def client_kwargs(
    options: RedisOptions, url: str, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``redis.Redis.from_url`` keyword arguments for ``url``."""
    kwargs: dict[str, str] = {}
    parts = urlsplit(url)
    secret = password(options, env)
    if secret is not None:
        if parts.password:
            raise ValueError(
                f"the Redis URL {redact_url(url)} has a password and a password file or "
                f"${ENV_PASSWORD} is set too; keep one (the file)"
            )
        kwargs["password"] = secret
    if (options.ca_file or options.cert_file) and parts.scheme != "rediss":
        raise ValueError(
            f"--redis-ca-file / --redis-cert-file need a TLS URL (rediss://...), got {redact_url(url)}"  # fmt: skip
        )
    files = (("ssl_ca_certs", options.ca_file), ("ssl_certfile", options.cert_file), ("ssl_keyfile", options.key_file))  # fmt: skip
    for key, value in files:
        if value:
            if not Path(value).is_file():
                raise ValueError(f"Redis TLS file {value} does not exist")
            kwargs[key] = value
    return kwargs


def connect(url: str, options: RedisOptions | None = None, **kwargs) -> redis.Redis:
    """A client for ``url`` with the password and TLS of ``options`` (or the environment)."""
    extra = client_kwargs(options or RedisOptions(), url)
    return redis.Redis.from_url(url, **extra, **kwargs)
