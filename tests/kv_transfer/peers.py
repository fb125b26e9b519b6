"""Peer processes for the dead-peer tests (started with the ``spawn`` context)."""

from __future__ import annotations

import logging
import time

from kv_transfer import TransferTicket, make_client, make_endpoint

from .conftest import DEATH, BlockPool, random_caches, tiny_layout


def _spec():
    from engine.kv_cache.layout import KVLayoutSpec

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
