"""In-process workers (real gRPC) behind an in-process router (real HTTP), with the
test-only hooks that break a worker's engine loop: no Ray, no production knob."""

from __future__ import annotations

import threading
import time

import httpx

import engine.worker.host as host_mod
from engine.config.router import RouterConfig
from engine.worker.host import RunningWorker
from router.server import Router, RouterThread

from .conftest import MODEL_NAME


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - t0


class Exits:
    """Replaces the process exit of a worker whose loop died (it would end pytest)."""

    def __init__(self, monkeypatch) -> None:
        self.codes: list[int] = []
        monkeypatch.setattr(host_mod, "_exit", self.codes.append, raising=False)


def kill_loop(worker: RunningWorker, monkeypatch) -> None:
    """The next loop iteration raises from the batch step, as a failed forward would."""

    def boom():
        raise RuntimeError("injected by the test: the batch forward failed")

    engine = worker.worker.engine
    monkeypatch.setattr(engine, "step", boom)
    monkeypatch.setattr(engine, "has_unfinished_requests", lambda: True)
    worker.worker.loop.wake()


def stall_loop(worker: RunningWorker, monkeypatch) -> threading.Event:
    """Every step blocks (the engine thread with it) until the returned event is set."""
    engine, release = worker.worker.engine, threading.Event()
    real = engine.step

    def stuck():
        release.wait(60)
        return real()

    monkeypatch.setattr(engine, "step", stuck)
    return release


def router(model, workers: list[RunningWorker], **cfg) -> RouterThread:
    config = RouterConfig(str(model), MODEL_NAME, **cfg)
    addresses = [w.address for w in workers]
    return Router(config, addresses, poll_interval_s=0.2).start_in_thread()


def complete(rt: RouterThread, prompt: list[int], timeout: float = 60.0) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    body |= {"ignore_eos": True, "return_token_ids": True}
    return httpx.post(rt.url + "/v1/completions", json=body, timeout=timeout)


def candidates(rt: RouterThread, role: str) -> set[str]:
    return {w.worker_id for w in rt.router.state.workers(role)}
