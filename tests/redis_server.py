"""A throwaway ``redis-server`` on a unix socket (tests only; ``make test`` installs it).

It listens on a socket file in its own temporary directory and on no TCP port: nothing
else on the machine can take its address, and a restart (``stop()`` then ``start()``)
comes back at the same URL, however busy the machine's ports are.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisServer:
    """Start with ``start()``; ``stop()``/``start()`` again restarts it empty at the same URL."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found; `make test` installs it (apt-get install redis-server)")  # fmt: skip
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        self.socket = str(Path(self.dir) / "redis.sock")
        self.url = f"unix://{self.socket}?db=0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        args = [self.exe, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700"]
        args += ["--dir", self.dir, "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=self.socket, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server not up at {self.socket} in {timeout_s}s"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, decode_responses=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
