"""A throwaway ``redis-server`` on a free loopback port (tests only; ``make test`` installs it),
optionally with a password (``requirepass``) and TLS (certificates made with ``openssl``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files in ``directory``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found (apt-get install openssl)")
    f = {n: directory / f"{n}.pem" for n in ("ca", "ca-key", "cert", "key", "csr")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pdserve-test-ca", "-keyout", str(f["ca-key"]), "-out", str(f["ca"]))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(f["key"]), "-out", str(f["csr"]))  # fmt: skip
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(f["csr"]), "-CA", str(f["ca"]), "-CAkey", str(f["ca-key"]), "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(f["cert"]))  # fmt: skip
    return f


class RedisServer:
    """Start with ``start()``; ``stop()``/``start()`` again restarts it empty on the same port.

    ``password``: clients must AUTH (``url`` carries no password; pass it separately).
    ``tls``: TLS only (``rediss://`` url); ``tls_files["ca"]`` is the CA to verify it with.
    """

    def __init__(self, password: str | None = None, tls: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found; `make test` installs it (apt-get install redis-server)")  # fmt: skip
        self.exe, self.port, self.password = exe, free_port(), password
        self.dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        self.tls_files = make_tls_files(Path(self.dir)) if tls else None
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def _args(self) -> list[str]:
        args = [self.exe, "--bind", "127.0.0.1", "--dir", self.dir, "--save", "", "--appendonly", "no"]  # fmt: skip
        if self.tls_files is None:
            args += ["--port", str(self.port)]
        else:
            f = self.tls_files
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(f["cert"])]
            args += ["--tls-key-file", str(f["key"]), "--tls-ca-cert-file", str(f["ca"]), "--tls-auth-clients", "no"]  # fmt: skip
        if self.password is not None:
            # via a config file on stdin: a --requirepass argument would show in `ps`
            args.insert(1, "-")
        return args

    def start(self) -> RedisServer:
        conf = f"requirepass {self.password}\n" if self.password is not None else None
        self.proc = subprocess.Popen(self._args(), stdin=subprocess.PIPE if conf else subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        if conf:
            self.proc.stdin.write(conf)
            self.proc.stdin.close()
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def client(self, **kw) -> redis.Redis:
        """An authenticated client (the password and CA passed as options, not in a URL)."""
        if self.tls_files is not None:
            kw.setdefault("ssl_ca_certs", str(self.tls_files["ca"]))
        return redis.Redis.from_url(self.url, password=self.password, **kw)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
