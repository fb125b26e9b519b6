"""``pdserve serve`` and ``pdserve worker``: start workers (on Ray or standalone) and the router."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

from router.cli_security import (
    add_security_args,
    cluster_secret,
    redis_options,
    secret_file,
    warn_password_in_url,
)
from router.edge_flags import add_api_args, add_edge_args, api_key_from_args, edge_config
from router.ep_launch import start_local_ep_group
from router.launcher import RayWorkers, WorkerSettings, start_ray
from router.redis_conn import redact_url

logger = logging.getLogger("pdserve")

TRANSPORTS = ["auto", "shm", "tcp", "ucx", "torch_dist"]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0 = aggregated)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    p.add_argument(
        "--node-ip", default="127.0.0.2", help="node IP of a local Ray instance (loopback)"
    )
    p.add_argument(
        "--ray-namespace",
        default=None,
        help="share the workers with every router naming this Ray namespace (detached "
        "actors: the first router starts them, the others reuse them, none stops them)",
    )
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="use this standalone worker (repeatable); skips Ray",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="share routing state (workers, load, prefix index) with other routers in this "
        "Redis, e.g. redis://127.0.0.1:6379/0 (default: in-memory, one router)",
    )
    p.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=3.0,
        help="with --redis-url: seconds a silent worker stays in the candidate set",
    )
    p.add_argument(
        "--router-only",
        action="store_true",
        help="start no workers: route to the workers registered in --redis-url",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds one engine step may run before the worker's Health reports it "
        "stalled and routers stop sending it requests (keep it above the slowest step)",
    )
    p.add_argument("--served-model-name", default=None, help="model name clients send")
    p.add_argument("--kv-transport", default="auto", choices=TRANSPORTS)
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=0,
        help="prefill on the decode worker when at most this many prompt tokens are uncached",
    )
    p.add_argument(
        "--prefill-overload-factor",
        type=float,
        default=8.0,
        help="prefill on the decode worker when remote prefill's predicted TTFT is more than "
        "this many times local prefill's (0 = off)",
    )
    p.add_argument("--prefill-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--prefill-ep-size", type=int, default=1, help="expert-parallel ranks per prefill worker")  # fmt: skip
    p.add_argument("--decode-ep-size", type=int, default=1, help="expert-parallel ranks per decode worker")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--max-inflight", type=int, default=256, help="429 above this")
    add_edge_args(p)
    add_api_args(p)
    add_security_args(p)


def settings_from_args(args: argparse.Namespace, model: str, transports) -> WorkerSettings:
    return WorkerSettings(
        model=str(model),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        kv_transports=tuple(transports),
        redis_url=args.redis_url,
        heartbeat_ttl_s=args.heartbeat_ttl,
        redis_options=redis_options(args),
        cluster_secret_file=secret_file(args),
        stall_timeout_s=args.stall_timeout,
    )


def worker_transports(choice: str) -> tuple[str, ...]:
    base = ("tcp", "shm")
    return base if choice in ("auto", *base) else (*base, choice)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.cli import ensure_demo_model
    from router.server import Router
    from router.service import RouterConfig

    start = time.monotonic()
    # Bind first: a taken port fails now, naming it, not after minutes of worker start-up.
    sock = bind_http(args.host, args.port)
    port = sock.getsockname()[1]
    logger.info("router bound to http://%s:%d; starting", args.host, port)
    model = str(args.model or ensure_demo_model())
    config = RouterConfig(
        model=model,
        served_model_name=args.served_model_name or os.path.basename(model.rstrip("/")),
        kv_transport=args.kv_transport,
        local_prefill_tokens=args.local_prefill_tokens,
        prefill_overload_factor=args.prefill_overload_factor,
        prefill_timeout_s=args.prefill_timeout,
        request_timeout_s=args.request_timeout,
        max_inflight=args.max_inflight,
        api_key=api_key_from_args(args),
        **edge_config(args),
    )
    ray_workers, state, secret = None, None, cluster_secret(args)
    warn_password_in_url(args)
    logger.info("worker gRPC and KV plane: %s", "authenticated (cluster secret)" if secret else "UNAUTHENTICATED (no cluster secret)")  # fmt: skip
    if args.redis_url:
        from router.redis_state import RedisClusterState

        state = RedisClusterState(args.redis_url, options=redis_options(args))
        logger.info("sharing cluster state in %s", state.url)
        if args.worker:
            raise ValueError("--worker with --redis-url: start those workers with --redis-url; routers discover them there")  # fmt: skip
    if args.router_only:
        if state is None:
            raise ValueError("--router-only needs --redis-url (where the cluster's workers are registered)")  # fmt: skip
        logger.info("router only: routing to the workers registered in %s", state.url)
    elif args.worker:
        logger.info("using %d standalone worker(s): %s", len(args.worker), ", ".join(args.worker))
    else:
        ray_workers = _launch(args, model, secret is not None)
    source = ray_workers.addresses if ray_workers is not None else list(args.worker)
    # uvicorn drains on SIGTERM, then re-raises it: exit 0 through the finally below (which
    # stops the Ray workers) rather than die by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        router = Router(config, source, state=state, discover=state is not None, secret=secret)
        mode = "aggregated" if not args.worker and args.prefill == 0 else "disaggregated"
        router.serve(args.host, port, _announcer(config, mode, start), sock=sock)
    finally:
        sock.close()
        if ray_workers is not None:
            _bounded(lambda: ray_workers.shutdown(disconnect=True), 10.0)
    return 0


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


def _launch(args: argparse.Namespace, model: str, auth: bool) -> RayWorkers:
    if args.decode < 1 or args.prefill < 0:
        raise ValueError(f"need --decode >= 1 and --prefill >= 0, got {args.decode}/{args.prefill}")  # fmt: skip
    logger.info("starting Ray (%s)", args.ray_address or f"local, node {args.node_ip}")
    start_ray(args.ray_address, args.node_ip, max(os.cpu_count() or 1, args.prefill * args.prefill_ep_size + args.decode * args.decode_ep_size + 1))  # fmt: skip
    ray_workers = RayWorkers(namespace=args.ray_namespace)
    settings = settings_from_args(args, model, worker_transports(args.kv_transport))
    settings = replace(settings, cluster_auth=auth)  # a worker without the secret refuses to start
    ray_workers.launch("prefill", args.prefill, replace(settings, ep_size=args.prefill_ep_size))
    ray_workers.launch("decode", args.decode, replace(settings, ep_size=args.decode_ep_size))
    logger.info("launching %d prefill + %d decode worker(s) for %s", args.prefill, args.decode, model)  # fmt: skip
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


def _announcer(config, mode: str, start: float):
    def announce(host: str, port: int) -> None:
        url = f"http://{host}:{port}"  # the bound port, also with --port 0
        logger.info(
            "pdserve ready in %.1fs (%s): %s/v1  model=%s  (try: curl %s/v1/models)",
            time.monotonic() - start, mode, url, config.served_model_name, url,
        )  # fmt: skip

    return announce


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, choices=["prefill", "decode"])
    p.add_argument("--host", default=None, help="bind address (default: this node's address)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    p.add_argument("--worker-id", default=None)
    p.add_argument(
        "--kv-transport",
        action="append",
        default=None,
        choices=TRANSPORTS[1:],
        help="KV backends to serve/send with (repeatable; default tcp and shm)",
    )
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (MoE models)")
    p.add_argument(
        "--redis-url",
        default=None,
        help="register in this shared cluster state and publish load and prefix-cache "
        "events there (routers started with --redis-url discover the worker)",
    )
    p.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=3.0,
        help="with --redis-url: routers drop the worker when silent this long (seconds)",
    )
    add_security_args(p)
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds one engine step may run before the worker's Health reports it "
        "stalled and routers stop sending it requests (keep it above the slowest step)",
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from decode_worker.runtime import default_host
    from decode_worker.server import start_worker
    from engine.cli import ensure_demo_model

    model = args.model or ensure_demo_model()
    warn_password_in_url(args)
    settings = settings_from_args(args, model, args.kv_transport or ("tcp", "shm"))
    settings = replace(settings, ep_size=args.ep_size, port=args.port)
    config = settings.worker_config(args.role, args.worker_id, args.host or default_host())
    from router.publisher import LayoutRefused

    stop, refused = threading.Event(), []
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running = start_worker(config, start_local_ep_group(settings, config), lambda why: (refused.append(why), stop.set()))  # fmt: skip
    except LayoutRefused as exc:
        logger.error("%s worker refused by the cluster state in %s: %s", args.role, redact_url(args.redis_url), exc)  # fmt: skip
        return 2
    print(f"{args.role} worker {running.info.worker_id} serving on {running.address}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    running.stop()
    return 2 if refused else 0
