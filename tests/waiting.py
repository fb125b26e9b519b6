"""Waiting without sleeping blindly, and threads whose failures reach the test.

``wait_until`` polls a condition until a deadline (the suite never sleeps for an event);
``Threads`` runs callables on threads and re-raises, in the test, the first exception
any of them raised (an assert inside a plain ``threading.Thread`` is only a warning).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> float:
    """Poll ``cond`` until it is truthy; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


class Threads:
    """``start(fn, *args)`` runs ``fn`` on a thread; ``join()`` waits for all of them and
    raises the first exception one raised (or fails naming the threads still running)."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported in join(), in the test's thread
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"test-{fn.__name__}{args}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if self.errors:
            raise self.errors[0]
        running = [t.name for t in self._threads if t.is_alive()]
        assert not running, f"threads still running after {timeout}s: {running}"


def wait_for_line(
    path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120.0
) -> re.Match:
    """The first match of ``pattern`` in the log file ``path`` of ``proc``, once it appears;
    fails with the log's tail if ``proc`` exits first or ``timeout`` passes."""
    regex, deadline = re.compile(pattern), time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if (m := regex.search(text)) is not None:
            return m
        if proc.poll() is not None:
            raise AssertionError(
                f"exited with {proc.returncode} before {pattern!r}:\n{text[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} within {timeout}s:\n{text[-3000:]}")
        time.sleep(0.1)
