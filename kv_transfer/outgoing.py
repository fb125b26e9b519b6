"""How one queued layer leaves the sender, by what its plane declared (plane.py
``Capabilities``), on the link's writer thread::

    writes_in_place   copy into the receiver's shared pool, descriptor after (shm pool)
    zero_copy_send    source blocks straight to the socket, hashed on the way (tcp)
    run_messages      a message per run consecutive on both sides straight from the
                      blocks, short runs gathered into staging (messages.py: ucx, torch_dist)
    otherwise         gather into staging, hashing while hot, then send (shm regions)

Each path puts the time the layer waited since ``send_layer`` in the descriptor
(``sender_delay_us``), from which the receiver measures the transfer's tail.
"""

from __future__ import annotations

import torch

from engine.kv_cache.layout import block_byte_views
from kv_transfer import messages, wire
from kv_transfer.plane import SenderPlane
from kv_transfer.sender import LayerJob
from proto import kv_transfer_pb2 as pb


def send_layer(plane: SenderPlane, job: LayerJob, chunk_bytes: int) -> None:
    caps = plane.capabilities
    half = len(job.transfer.ticket.block_ids) * _block_bytes(job)
    if caps.writes_in_place and in_place(job.transfer.ticket):
        plane.write_layer(descriptor(job, slice(None), half, 0, chunk_bytes), job)
    elif caps.zero_copy_send and _host_contiguous(job):
        _send_parts(plane, job, chunk_bytes)
    elif caps.run_messages:
        _send_runs(plane, job, chunk_bytes)
    else:
        _send_staged(plane, job, chunk_bytes)


def in_place(ticket) -> bool:
    """Written straight into the receiver's pool: whole tickets only. A TP part fills some
    heads of blocks that other parts fill too, which the pool's per-block fence and
    checksums do not divide, so parts go through the plane's staged path."""
    return ticket.heads is None


def descriptor(
    job: LayerJob, blocks: slice, half_bytes: int, checksum: int, chunk_bytes: int
) -> pb.PageDescriptor:
    ticket = job.transfer.ticket
    return pb.PageDescriptor(
        transfer_id=ticket.transfer_id,
        epoch=ticket.epoch,
        layer=job.layer,
        block_ids=ticket.block_ids[blocks],
        k_bytes=half_bytes,
        v_bytes=half_bytes,
        checksum=checksum,
        chunk_bytes=chunk_bytes,
        sender_delay_us=job.delay_us(),
    )


def _block_bytes(job: LayerJob) -> int:
    return job.k[0].numel() * job.k.element_size()


def _host_contiguous(job: LayerJob) -> bool:
    return job.k.device.type == "cpu" and job.k.is_contiguous() and job.v.is_contiguous()


def _gather(source: torch.Tensor, idx: torch.Tensor | None, a: int, b: int, pages: torch.Tensor) -> None:  # fmt: skip
    """``pages`` = blocks ``a:b`` of the job (its source ids, or pages ``a:b``)."""
    if idx is None:
        pages.copy_(source[a:b])
    elif source.device == pages.device:  # gather straight into staging
        torch.index_select(source, 0, idx[a:b], out=pages)
    else:  # e.g. a CUDA cache staged in host memory for tcp/shm
        pages.copy_(source.index_select(0, idx[a:b]))


def _send_staged(plane: SenderPlane, job: LayerJob, chunk_bytes: int) -> None:
    """Gather (or copy) pages into the plane's staging memory, hashing while hot.

    A plane with ``max_payload_bytes`` gets the layer as several descriptors, each for a
    slice of the ticket's blocks, so its buffers stay cache-sized."""
    n, bb = len(job.transfer.ticket.block_ids), _block_bytes(job)
    cap = plane.capabilities.max_payload_bytes or 2 * n * bb
    step = max(1, cap // (2 * bb))
    for a in range(0, n, step):
        m = min(step, n - a)
        staging = plane.staging(2 * m * bb)
        checksum = wire.Checksum(plane.capabilities.checksum)
        for i, source in enumerate((job.k, job.v)):
            pages = staging[i * m * bb : (i + 1) * m * bb].view(job.k.dtype)
            pages = pages.view(m, *job.k.shape[1:])
            for c0, c1 in wire.chunk_plan(m, bb, chunk_bytes):
                _gather(source, job.src_block_ids, a + c0, a + c1, pages[c0:c1])
                checksum.update(pages[c0:c1])
        plane.send(descriptor(job, slice(a, a + m), m * bb, checksum.value(), chunk_bytes), staging)  # fmt: skip


def _send_parts(plane: SenderPlane, job: LayerJob, chunk_bytes: int) -> None:
    """Zero-copy: send the source blocks as they lie in the cache (no staging copy)."""
    if job.src_block_ids is None:
        parts = [wire.byte_view(job.k), wire.byte_view(job.v)]
    else:
        ids = job.src_block_ids.tolist()
        parts = block_byte_views(job.k, ids) + block_byte_views(job.v, ids)
    nbytes = sum(p.nbytes for p in parts) // 2
    # The plane hashes each chunk as it sends it and puts the checksum in a trailer.
    plane.send_parts(descriptor(job, slice(None), nbytes, 0, chunk_bytes), parts)


def _send_runs(plane: SenderPlane, job: LayerJob, chunk_bytes: int) -> None:
    """A message per run consecutive on both sides, straight from the source blocks where
    this side's ids are consecutive, gathered into staging where not (messages.py)."""
    ticket, bb = job.transfer.ticket, _block_bytes(job)
    n = len(ticket.block_ids)
    src = job.src_block_ids.tolist() if job.src_block_ids is not None else list(range(n))
    min_run = plane.capabilities.run_min_bytes
    spans = messages.segments(messages.plan(src, ticket.block_ids, bb, chunk_bytes, min_run))
    # A TP part's source is a slice of the heads (not contiguous): every run is staged.
    whole = job.k.is_contiguous() and job.v.is_contiguous()
    direct = [whole and messages.consecutive(src[a:b]) for a, b in spans]
    staging = plane.staging(2 * bb * sum(b - a for (a, b), d in zip(spans, direct, strict=True) if not d))  # fmt: skip
    if any(direct) and job.k.device != staging.device:  # no run straight from this cache
        direct, staging = [False] * len(spans), plane.staging(2 * bb * n)
    checksum, parts, at = wire.Checksum(plane.capabilities.checksum), [], 0
    for source in (job.k, job.v):
        for (a, b), d in zip(spans, direct, strict=True):
            if d:
                part = messages.run_view(source, src[a:b])
            else:
                part, at = staging[at : at + (b - a) * bb], at + (b - a) * bb
                _gather(source, job.src_block_ids, a, b, part.view(job.k.dtype).view(b - a, *job.k.shape[1:]))  # fmt: skip
            checksum.update(part)
            parts.append(part)
    desc = descriptor(job, slice(None), n * bb, checksum.value(), chunk_bytes)
    desc.message_blocks.extend(b - a for a, b in spans)
    plane.send_messages(desc, parts)
