"""KV transfer bandwidth: each backend vs the raw ceiling of its path, two processes.

    python -m bench.kv_transfer [--json] [--runs 5] [--backends tcp,shm,...] [--layout scattered]

The parent process is the decode side (a receiver endpoint); a spawned child is the
prefill side. Per run the child moves the KV of a 2048-token prompt of a Llama-8B-shaped
layout (32 layers, 8 kv heads, head dim 128, bf16, block size 16 -> 256 MiB) layer by
layer, from scattered source blocks into scattered destination blocks (``--layout
scattered``, the default: random 128 of 256 on each side; ``runs``: consecutive blocks on
both sides, as a fresh worker's block pool hands them out), and
times first ``send_layer`` -> SUCCESS. The ceiling moves the same bytes on the same path
with nothing else, from one contiguous 256 MiB buffer into another: one memcpy (shm), a
raw socket stream (tcp), one raw ucxx send (ucx), one raw gloo send/recv (torch_dist).
Medians over ``--runs``.
The last line printed is JSON: per backend ``gbps``, ``ceiling_gbps``, ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from datetime import timedelta

import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.shared_pool import SharedKVPool
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import TransferState, backend_names, make_client, make_endpoint

logger = logging.getLogger("bench.kv_transfer")
TOKENS = 2048
LAYOUT = KVLayout(
    num_layers=32,
    num_blocks=256,
    block_size=16,
    num_kv_heads=8,
    head_dim=128,
    dtype=torch.bfloat16,
)
SPEC = KVLayoutSpec.from_layout(LAYOUT, "llama-8b-shaped")
NBLOCKS = LAYOUT.num_blocks_for(TOKENS)
NBYTES = 2 * LAYOUT.num_layers * NBLOCKS * LAYOUT.block_bytes
LAYER_BYTES = NBYTES // LAYOUT.num_layers


VARIANTS = {"shm-regions": "shm"}
"""Measured variants of a backend -> its name."""


LAYOUTS = ("scattered", "runs")


def block_ids(layout: str, seed: int) -> list[int]:
    """The transfer's blocks on one side: random (``scattered``) or consecutive (``runs``,
    at an offset that differs per side)."""
    if layout == "runs":
        start = seed * 37 % (LAYOUT.num_blocks - NBLOCKS)
        return list(range(start, start + NBLOCKS))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(LAYOUT.num_blocks, generator=g)[:NBLOCKS].tolist()


def gbps(seconds: float) -> float:
    return NBYTES / seconds / 1e9


# -- prefill side (child process) --------------------------------------------------------
class SenderAgent:
    """Runs in the child: answers each command with the seconds it took."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.src = [
            tuple(torch.randn(LAYOUT.cache_shape).to(LAYOUT.dtype) for _ in "kv")
            for _ in range(LAYOUT.num_layers)
        ]
        self.clients: dict[str, object] = {}

    def kv(self, backend: str, arg) -> float:
        ticket, layout = arg
        client = self.clients.setdefault(backend, make_client(backend, SPEC))
        src_ids = block_ids(layout, seed=1)
        ended = threading.Event()  # on_done: the worker loops are event-driven too
        tx = client.open(ticket, on_done=lambda tid, state: ended.set())
        start = time.perf_counter()
        for layer, (k, v) in enumerate(self.src):
            tx.send_layer(layer, k, v, src_block_ids=src_ids)
        tx.finish()
        ended.wait(600)
        if tx.poll() is not TransferState.SUCCESS:
            raise RuntimeError(f"{backend} transfer failed: {tx.error}")
        return time.perf_counter() - start

    def raw_shm(self, _backend: str, _: object) -> float:
        src = torch.ones(NBYTES, dtype=torch.uint8)
        dst = torch.zeros_like(src)
        dst.copy_(src)  # fault the pages in first: the KV caches are resident too
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    def raw_tcp(self, _backend: str, port: int) -> float:
        buf = memoryview(torch.ones(NBYTES, dtype=torch.uint8).numpy())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = time.perf_counter()
            sock.sendall(buf)
            sock.recv(1)
            return time.perf_counter() - start

    def raw_ucx(self, _backend: str, port: int) -> float:
        from kv_transfer.backends.ucx import UcxLoop
        from kv_transfer.base import TransferConfig

        ucx = UcxLoop.get(TransferConfig())
        buf, ack = (
            torch.ones(NBYTES, dtype=torch.uint8).numpy(),
            torch.empty(1, dtype=torch.uint8).numpy(),
        )

        async def go() -> float:
            ep = await ucx.ucxx.create_endpoint("127.0.0.1", port)
            start = time.perf_counter()
            await ep.send(buf)
            await ep.recv(ack)
            took = time.perf_counter() - start
            await ep.close()
            return took

        return ucx.run(go(), timeout=120)

    def raw_torch_dist(self, _backend: str, arg: tuple[int, str]) -> float:
        group = _gloo_group(arg[0], rank=1, key=arg[1])
        buf, ack = torch.ones(NBYTES, dtype=torch.uint8), torch.empty(1, dtype=torch.uint8)
        start = time.perf_counter()
        group.send([buf], 0, 0).wait()
        group.recv([ack], 0, 1).wait()
        return time.perf_counter() - start


def _gloo_group(port: int, rank: int, store=None, key: str = "raw"):
    import torch.distributed as dist

    store = store or dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=60))
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timedelta(seconds=120)
    return dist.ProcessGroupGloo(dist.PrefixStore(key, store), rank, 2, opts)


def agent_main(commands, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    agent = SenderAgent()
    results.put("ready")
    while (cmd := commands.get()) is not None:
        method, backend, arg = cmd
        try:
            results.put(getattr(agent, method)(backend, arg))
        except Exception as exc:  # report, keep serving
            results.put(f"error: {exc!r}")


# -- decode side (parent) ------------------------------------------------------------------
class Bench:
    def __init__(self, runs: int, layout: str = "scattered"):
        self.runs, self.layout = runs, layout
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.child = ctx.Process(target=agent_main, args=(self.commands, self.results), daemon=True)
        self.child.start()
        self.dst = LAYOUT.allocate()
        self.pool = SharedKVPool.create(LAYOUT)  # shm writes in place into it
        # Ceilings receive into one pre-faulted buffer, as the KV path writes resident caches.
        self.sink = torch.ones(NBYTES, dtype=torch.uint8)
        if (msg := self.results.get(timeout=300)) != "ready":
            raise RuntimeError(msg)

    def ask(self, method: str, backend: str, arg: object) -> float:
        self.commands.put((method, backend, arg))
        result = self.results.get(timeout=600)
        if isinstance(result, str):
            raise RuntimeError(f"{backend} {method}: {result}")
        return result

    def runs_of(self, variant: str) -> tuple[list[float], list[float]]:
        """Alternate KV runs and ceiling runs, so both see the same background load.
        ``shm`` receives into a shared KV pool (written in place, as a decode worker's),
        ``shm-regions`` into a private cache (through shared regions)."""
        backend = VARIANTS.get(variant, variant)
        dst = self.pool.caches if variant == "shm" else self.dst
        endpoint = make_endpoint(backend, LAYOUT, dst, SPEC, lambda ids: None)
        ceiling = getattr(self, f"_ceiling_{backend}")
        try:
            self._kv(endpoint, backend)  # pairs and warms up
            pairs = [(self._kv(endpoint, backend), ceiling()) for _ in range(self.runs)]
        finally:
            endpoint.close()
        return [kv for kv, _ in pairs], [c for _, c in pairs]

    def _kv(self, endpoint, backend: str) -> float:
        rx = endpoint.expect(block_ids(self.layout, seed=2), lease_s=120)
        took = self.ask("kv", backend, (rx.ticket, self.layout))
        if rx.poll() is not TransferState.SUCCESS:
            raise RuntimeError(f"{backend}: receiver ended {rx.poll()}: {rx.error}")
        return took

    def _ceiling_shm(self) -> float:
        return self.ask("raw_shm", "shm", None)

    def _ceiling_tcp(self) -> float:
        server = socket.create_server(("127.0.0.1", 0))

        buf = memoryview(self.sink.numpy())

        def serve() -> None:
            conn, _ = server.accept()
            got = 0
            while got < NBYTES:
                got += conn.recv_into(buf[got:])
            conn.sendall(b"k")
            conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        took = self.ask("raw_tcp", "tcp", server.getsockname()[1])
        thread.join()
        server.close()
        return took

    def _ceiling_ucx(self) -> float:
        from kv_transfer.backends.ucx import UcxLoop
        from kv_transfer.base import TransferConfig

        ucx = UcxLoop.get(TransferConfig())
        buf = self.sink.numpy()

        async def handler(ep) -> None:
            await ep.recv(buf)
            await ep.send(torch.ones(1, dtype=torch.uint8).numpy())
            await ep.close()

        async def listen():
            return ucx.ucxx.create_listener(handler, port=0)

        listener = ucx.run(listen(), timeout=30)
        took = self.ask("raw_ucx", "ucx", listener.port)
        ucx.loop.call_soon_threadsafe(listener.close)
        return took

    def _ceiling_torch_dist(self) -> float:
        import torch.distributed as dist

        store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        out: list = []
        key = f"raw{time.time_ns()}"

        def serve() -> None:
            group = _gloo_group(store.port, rank=0, store=store, key=key)
            buf = self.sink
            group.recv([buf], 1, 0).wait()
            group.send([torch.ones(1, dtype=torch.uint8)], 1, 1).wait()
            out.append(group)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        took = self.ask("raw_torch_dist", "torch_dist", (store.port, key))
        thread.join()
        return took

    def close(self) -> None:
        self.commands.put(None)
        self.child.join(30)


def summarise(kv: list[float], ceiling: list[float]) -> dict:
    g, c = statistics.median(map(gbps, kv)), statistics.median(map(gbps, ceiling))
    paired = statistics.median(c_t / kv_t for kv_t, c_t in zip(kv, ceiling, strict=True))
    return {
        "gbps": round(g, 3),
        "ceiling_gbps": round(c, 3),
        "ratio": round(g / c, 3),
        "paired_ratio": round(paired, 3),
        "gbps_runs": [round(gbps(t), 3) for t in kv],
        "ceiling_gbps_runs": [round(gbps(t), 3) for t in ceiling],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only progress and the JSON line")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default=",".join([*backend_names(), *VARIANTS]))
    parser.add_argument("--layout", choices=LAYOUTS, default="scattered")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    bench = Bench(args.runs, args.layout)
    report = {}
    try:
        for backend in args.backends.split(","):
            mib = NBYTES / 2**20
            logger.info("%s: %d KV + ceiling runs of %.0f MiB ...", backend, args.runs, mib)
            report[backend] = summarise(*bench.runs_of(backend))
            if not args.json:
                r = report[backend]
                print(
                    f"{backend:>10}: {r['gbps']:.2f} GB/s, ceiling {r['ceiling_gbps']:.2f} GB/s, ratio {r['ratio']:.2f}"
                )
    finally:
        bench.close()
    out = {"bytes": NBYTES, "tokens": TOKENS, "runs": args.runs, "layout": args.layout}
    print(json.dumps({**out, "load_average": os.getloadavg(), "backends": report}))


if __name__ == "__main__":
    main()
