"""tcp: page bytes follow their descriptor on the control socket itself.

Per layer, under the link's write lock::

    sender:   PageDescriptor -> for each ~chunk_bytes batch of source blocks: xxh3 the
              batch, sendmsg() it straight from the cache (iovec, no staging copy)
              -> PageTrailer(checksum)
    receiver: descriptor -> recvmsg_into() straight into the destination blocks, one
              chunk at a time, xxh3 each chunk while hot -> trailer -> compare

A transfer that failed meanwhile has its remaining bytes read into scratch, never into
the cache; so are the announced bytes of a descriptor whose sizes do not fit the layout
(``discard``), then its trailer, which keeps the link in sync for other transfers. Caches not in host memory go through a staging buffer instead (checksum in
the descriptor). Works anywhere; several transfers share one link per endpoint and
interleave layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from kv_transfer.backends.buffers import GrowBuffer
from kv_transfer.base import TransferConfig
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.plane import Backend, Capabilities, SimpleHost
from kv_transfer.wire import Checksum, byte_view, encode_frame
from proto import kv_transfer_pb2 as pb

_SKIP_BYTES = 1 << 20


class TcpSender:
    capabilities = Capabilities(zero_copy_send=True)
    """Takes ``send_parts``: page bytes straight from the source blocks."""

    def __init__(self, link: ControlLink):
        self._link = link
        self._buf = GrowBuffer()

    def staging(self, nbytes: int) -> torch.Tensor:
        return self._buf.get(nbytes)

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        self._link.send(pb.Frame(pages=desc), [byte_view(staging)])

    def send_parts(self, desc: pb.PageDescriptor, parts: list[memoryview]) -> None:
        """Descriptor, then each chunk hashed just before it is sent, then the trailer."""
        desc.checksum_in_trailer = True
        checksum = Checksum(self.capabilities.checksum)
        with self._link.writing() as write:
            write([memoryview(encode_frame(pb.Frame(pages=desc)))])
            for batch in _batches(parts, desc.chunk_bytes):
                for part in batch:
                    checksum.update(part)
                write(batch)
            trailer = pb.PageTrailer(
                transfer_id=desc.transfer_id, layer=desc.layer, checksum=checksum.value()
            )
            write([memoryview(encode_frame(pb.Frame(trailer=trailer)))])

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        pass


class TcpReceiver:
    capabilities = Capabilities(direct_recv=True)
    """Takes ``recv_views``: page bytes straight into the destination blocks."""

    def __init__(self, link: ControlLink):
        self._link = link
        self._buf = GrowBuffer()

    def recv_views(self, views: list[memoryview]) -> None:
        self._link.recv_into_views(views)

    def scratch(self, nbytes: int) -> torch.Tensor:
        return self._buf.get(nbytes)

    def trailer(self, desc: pb.PageDescriptor) -> int:
        """Read the PageTrailer that follows the payload; its checksum."""
        frame = self._link.recv_frame()
        t = frame.trailer
        if not frame.HasField("trailer") or (t.transfer_id, t.layer) != (
            desc.transfer_id,
            desc.layer,
        ):
            raise PeerLost(
                f"expected the trailer of layer {desc.layer}, got {frame.WhichOneof('kind')}"
            )
        return t.checksum

    def chunks(self, desc: pb.PageDescriptor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
        for size in sizes:
            chunk = self._buf.get(size)
            self._link.recv_into(byte_view(chunk))
            yield chunk

    def discard(self, desc: pb.PageDescriptor) -> None:
        """Read the ``k_bytes + v_bytes`` that follow the descriptor (and its trailer)
        through a scratch buffer of at most 1 MiB."""
        left = desc.k_bytes + desc.v_bytes
        while left:
            n = min(left, _SKIP_BYTES)
            self._link.recv_into(byte_view(self._buf.get(n)))
            left -= n
        if desc.checksum_in_trailer:
            self.trailer(desc)

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        pass


def _batches(parts: list[memoryview], chunk_bytes: int) -> Iterator[list[memoryview]]:
    batch: list[memoryview] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += part.nbytes
        if size >= chunk_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _connect(link: ControlLink, params: Mapping[str, str], config: TransferConfig) -> TcpSender:
    return TcpSender(link)


BACKEND = Backend(
    name="tcp",
    host=lambda args: SimpleHost(TcpReceiver),
    connect=_connect,
)
