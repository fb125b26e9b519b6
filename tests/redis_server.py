"""A throwaway ``redis-server`` (tests only; ``make test`` installs it), optionally with a
password (``requirepass``) or TLS (certificates made with ``openssl``).

Plain and password servers listen on a unix socket in their own temporary directory and
on no TCP port: nothing else on the machine can take their address, and a restart
(``stop()`` then ``start()``) comes back at the same URL, however busy the ports are.
A TLS server needs TCP (redis has no TLS on unix sockets): it takes a free loopback port
and, should another process take that port before redis binds it, starts again on another.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def _free_port() -> int:
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
    """Start with ``start()``; ``stop()``/``start()`` again restarts it empty at the same URL.

    ``password``: clients must AUTH (``url`` carries no password; pass it separately).
    ``tls``: TLS only (``rediss://`` url); ``tls_files["ca"]`` is the CA to verify it with.
    """

    def __init__(self, password: str | None = None, tls: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found; `make test` installs it (apt-get install redis-server)")  # fmt: skip
        self.exe, self.password = exe, password
        self.dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        self.tls_files = make_tls_files(Path(self.dir)) if tls else None
        self.socket = str(Path(self.dir) / "redis.sock")
        self.port = _free_port() if tls else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls_files is not None:
            return f"rediss://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}?db=0"

    def _args(self) -> list[str]:
        args = [self.exe, "--dir", self.dir, "--save", "", "--appendonly", "no"]
        if self.tls_files is None:
            args += ["--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
        else:
            f = self.tls_files
            args += ["--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(f["cert"]), "--tls-key-file", str(f["key"])]
            args += ["--tls-ca-cert-file", str(f["ca"]), "--tls-auth-clients", "no"]
        if self.password is not None:
            # via a config file on stdin: a --requirepass argument would show in `ps`
            args.insert(1, "-")
        return args

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        for _ in range(5):
            if self._start_once(timeout_s):
                return self
            self.port = _free_port()  # TLS only: the port was taken meanwhile
        raise RuntimeError(f"redis-server could not bind a TLS port in 5 tries ({self.dir})")

    def _start_once(self, timeout_s: float) -> bool:
        conf = f"requirepass {self.password}\n" if self.password is not None else None
        stdin = subprocess.PIPE if conf else subprocess.DEVNULL
        self.proc = subprocess.Popen(self._args(), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        if conf:
            self.proc.stdin.write(conf)
            self.proc.stdin.close()
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return True
                except redis.RedisError:
                    if self.proc.poll() is not None:
                        if self.tls_files is not None:
                            return False
                        raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None  # fmt: skip
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server not up at {self.url} in {timeout_s}s") from None  # fmt: skip
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self, **kw) -> redis.Redis:
        """An authenticated client (the password and CA passed as options, not in a URL)."""
        kw.setdefault("decode_responses", True)
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
