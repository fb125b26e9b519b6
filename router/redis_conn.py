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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

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


@dataclass(frozen=True)
class RedisOptions:
    """Credentials and TLS for the Redis connection: file paths only, never a secret value
    (so the options can travel to Ray actors and processes as they are)."""

    password_file: str | None = None
    """File holding the password (see the module docstring for the fallbacks)."""
    ca_file: str | None = None
    """``rediss://``: verify the server's certificate against this CA bundle."""
    cert_file: str | None = None
    """``rediss://``: client certificate (PEM), with ``key_file``."""
    key_file: str | None = None
    """``rediss://``: the client certificate's private key (PEM)."""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--redis-cert-file and --redis-key-file go together; pass both")

    def password(self, env: Mapping[str, str] | None = None) -> str | None:
        env = os.environ if env is None else env
        path = self.password_file or env.get(ENV_PASSWORD_FILE)
        if path:
            return _read(path, "Redis password")
        return env.get(ENV_PASSWORD) or None

    def client_kwargs(self, url: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """``redis.Redis.from_url`` keyword arguments for ``url``."""
        kwargs: dict[str, str] = {}
        parts = urlsplit(url)
        password = self.password(env)
        if password is not None:
            if parts.password:
                raise ValueError(
                    f"the Redis URL {redact_url(url)} has a password and a password file or "
                    f"${ENV_PASSWORD} is set too; keep one (the file)"
                )
            kwargs["password"] = password
        if (self.ca_file or self.cert_file) and parts.scheme != "rediss":
            raise ValueError(
                f"--redis-ca-file / --redis-cert-file need a TLS URL (rediss://...), got {redact_url(url)}"  # fmt: skip
            )
        for key, value in (("ssl_ca_certs", self.ca_file), ("ssl_certfile", self.cert_file), ("ssl_keyfile", self.key_file)):  # fmt: skip
            if value:
                if not Path(value).is_file():
                    raise ValueError(f"Redis TLS file {value} does not exist")
                kwargs[key] = value
        return kwargs


def connect(url: str, options: RedisOptions | None = None, **kwargs) -> redis.Redis:
    """A client for ``url`` with the password and TLS of ``options`` (or the environment)."""
    extra = (options or RedisOptions()).client_kwargs(url)
    return redis.Redis.from_url(url, **extra, **kwargs)
