"""Peer processes for the dead-peer tests (started with the ``spawn`` context)."""

from __future__ import annotations

import logging
import time

from kv_transfer import TransferTicket, make_client, make_endpoint

from .conftest import DEATH, FAST, BlockPool, random_caches, tiny_layout


def _spec():
    from engine.kv_cache.spec import KVLayoutSpec

    layout = tiny_layout()
    return layout, KVLayoutSpec.from_layout(layout, "test-model")


def run_sender(backend: str, ticket: TransferTicket, sent, layers: int) -> None:
    """Send ``layers`` layers for ``ticket``, report it, then wait to be killed."""
    logging.basicConfig(level=logging.WARNING)
    layout, spec = _spec()
    src = random_caches(layout, 1)
    tx = make_client(backend, spec, config=DEATH).open(ticket)
    for layer in range(layers):
        tx.send_layer(layer, *src[layer], src_block_ids=list(range(len(ticket.block_ids))))
    sent.set()
    time.sleep(600)


def run_receiver(backend: str, tickets) -> None:
    """Serve one transfer, hand its ticket to the parent, then wait to be killed."""
    logging.basicConfig(level=logging.WARNING)
    layout, spec = _spec()
    pool = BlockPool(layout.num_blocks)
    endpoint = make_endpoint(backend, layout, layout.allocate(), spec, pool.free, config=DEATH)
    rx = endpoint.expect(pool.allocate(4), lease_s=60)
    tickets.put(rx.ticket)
    time.sleep(600)


def run_endpoint(
    backend: str, handshake_timeout_s: float, out, done, fd_headroom: int | None = None, **cfg
) -> None:
    """Serve one 4-block transfer: hand ``(address, ticket)`` to the parent, then report
    the transfer's final state and error on ``out`` and wait for ``done``. With
    ``fd_headroom`` the process may open only that many more file descriptors; ``cfg``
    overrides more of the endpoint's TransferConfig."""
    import dataclasses
    import os
    import resource

    logging.basicConfig(level=logging.WARNING)
    layout, spec = _spec()
    pool = BlockPool(layout.num_blocks)
    config = dataclasses.replace(FAST, handshake_timeout_s=handshake_timeout_s, **cfg)
    endpoint = make_endpoint(backend, layout, layout.allocate(), spec, pool.free, config=config)
    rx = endpoint.expect(pool.allocate(4), lease_s=120)
    if fd_headroom is not None:
        # Fill the gaps below the highest descriptor (a new one takes the lowest free
        # number), so exactly ``fd_headroom`` more fit under the limit.
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(top + 1 - len(os.listdir("/proc/self/fd")))]  # fmt: skip
        top = max(top, *fillers) if fillers else top
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + fd_headroom, hard))
    out.put((endpoint.address, rx.ticket))
    while not rx.poll().terminal:
        time.sleep(0.01)
    out.put((rx.poll().value, rx.error, endpoint.stats()))
    done.wait(120)
    endpoint.close()


def run_pausing_sender(backend: str, ticket: TransferTicket, sent, go, done, seed: int) -> None:
    """Send layers 0 and 1, report it, wait for ``go``, send the rest from other source
    pages (seed ``seed``), report when the transfer ended, then wait to be killed."""
    logging.basicConfig(level=logging.WARNING)
    layout, spec = _spec()
    first, rest = random_caches(layout, 1), random_caches(layout, seed)
    tx = make_client(backend, spec, config=DEATH).open(ticket)
    ids = list(range(len(ticket.block_ids)))
    for layer in range(layout.num_layers):
        if layer == 2:
            sent.set()
            go.wait(120)
        tx.send_layer(layer, *(first if layer < 2 else rest)[layer], src_block_ids=ids)
    while not tx.poll().terminal:
        time.sleep(0.01)
    done.set()
    time.sleep(600)
