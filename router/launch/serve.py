"""``pdserve serve`` and ``pdserve worker``: start workers (on Ray or standalone) and the router.

serve:  flags -> ServeConfig -> bind the HTTP port (a taken one fails now, naming it)
        -> cluster state (memory, or Redis) -> workers: Ray actors, --worker
        addresses, or none (--router-only) -> Router.serve on the bound socket
worker: flags -> WorkerConfig -> [TP/EP followers] -> start_worker -> wait for SIGTERM
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

from engine.config import ServeConfig
from router.launch.flags import launched_worker, serve_config, worker_config
from router.launch.group_launch import start_local_group
from router.launch.ray_launcher import RayWorkers, start_ray
from router.launch.secrets import cluster_secret, warn_password_in_url
from router.state.redis_conn import redact_url

logger = logging.getLogger("pdserve")


def cmd_serve(args: argparse.Namespace) -> int:
    start = time.monotonic()
    config = serve_config(args)
    # Bind first: a taken port fails now, naming it, not after minutes of worker start-up.
    sock = bind_http(config.host, config.port)
    port = sock.getsockname()[1]
    logger.info("router bound to http://%s:%d; starting", config.host, port)
    secret = cluster_secret(config.cluster_secret_file)
    warn_password_in_url(config.state)
    logger.info("worker gRPC and KV plane: %s", "authenticated (cluster secret)" if secret else "UNAUTHENTICATED (no cluster secret)")  # fmt: skip
    ray_workers, state = None, _state(config)
    if not config.router_only and not config.workers:
        ray_workers = _launch(config, secret is not None)
    source = ray_workers.addresses if ray_workers is not None else list(config.workers)
    # uvicorn drains on SIGTERM, then re-raises it: exit 0 through the finally below (which
    # stops the Ray workers) rather than die by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        _serve(config, source, state, secret, sock, start)
    finally:
        sock.close()
        if ray_workers is not None:
            _bounded(lambda: ray_workers.shutdown(disconnect=True), 10.0)
    return 0


def _serve(config: ServeConfig, source, state, secret, sock: socket.socket, start: float) -> None:
    from router.server import Router

    router = Router(config.router, source, state=state, discover=state is not None, secret=secret)
    mode = "aggregated" if not config.workers and config.num_prefill == 0 else "disaggregated"
    router.serve(config.host, sock.getsockname()[1], _announcer(config, mode, start), sock=sock)


def _state(config: ServeConfig):
    """The cluster state (``None``: in memory); checks the flags that go with it."""
    state = None
    if config.state.redis_url:
        from router.state.redis import RedisClusterState

        state = RedisClusterState.from_config(config.state)
        logger.info("sharing cluster state in %s", state.url)
        if config.workers:
            raise ValueError("--worker with --redis-url: start those workers with --redis-url; routers discover them there")  # fmt: skip
    if config.router_only:
        if state is None:
            raise ValueError("--router-only needs --redis-url (where the cluster's workers are registered)")  # fmt: skip
        logger.info("router only: routing to the workers registered in %s", state.url)
    elif config.workers:
        logger.info("using %d standalone worker(s): %s", len(config.workers), ", ".join(config.workers))  # fmt: skip
    return state


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def bind_http(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0 = any free port), held until the router serves
    on it, so nothing can take the port meanwhile; a taken port is a ``ValueError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {exc.strerror}; stop what holds port {port} "
            "or pass another --port (0 = any free port)"
        ) from None
    return sock


def _launch(config: ServeConfig, auth: bool) -> RayWorkers:
    ray = config.ray
    logger.info("starting Ray (%s)", ray.address or f"local, node {ray.node_ip}")
    ranks = sum(
        n * c.engine.parallel.ep_size * c.engine.parallel.tp_size
        for n, c in ((config.num_prefill, config.prefill), (config.num_decode, config.decode))
    )
    start_ray(ray.address, ray.node_ip, max(os.cpu_count() or 1, ranks + 1))
    ray_workers = RayWorkers(namespace=ray.namespace)
    ray_workers.launch("prefill", config.num_prefill, launched_worker(config, "prefill", auth))
    ray_workers.launch("decode", config.num_decode, launched_worker(config, "decode", auth))
    logger.info("launching %d prefill + %d decode worker(s) for %s", config.num_prefill, config.num_decode, config.router.model)  # fmt: skip
    for wid, info in ray_workers.wait_ready().items():
        logger.info("  %s ready at %s (pid %d)", wid, info["address"], info["pid"])
    return ray_workers


def _bounded(fn, timeout_s: float) -> None:
    """Run a shutdown step that may hang when Ray is already gone (signals to the group)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        logger.warning("Ray shutdown did not finish in %.0fs; exiting anyway", timeout_s)


def _announcer(config: ServeConfig, mode: str, start: float):
    def announce(host: str, port: int) -> None:
        url = f"http://{host}:{port}"  # the bound port, also with --port 0
        logger.info(
            "pdserve ready in %.1fs (%s): %s/v1  model=%s  (try: curl %s/v1/models)",
            time.monotonic() - start, mode, url, config.router.served_model_name, url,
        )  # fmt: skip

    return announce


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.worker.info import default_host
    from router.launch.worker_main import start_worker
    from router.state.publisher import LayoutRefused

    config = worker_config(args)
    config = config if config.host else replace(config, host=default_host())
    warn_password_in_url(config.state)
    stop, refused = threading.Event(), []
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running = start_worker(config, start_local_group(config), lambda why: (refused.append(why), stop.set()))  # fmt: skip
    except LayoutRefused as exc:
        logger.error("%s worker refused by the cluster state in %s: %s", config.role, redact_url(config.state.redis_url or ""), exc)  # fmt: skip
        return 2
    print(f"{config.role} worker {running.info.worker_id} serving on {running.address}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    running.stop()
    return 2 if refused else 0
