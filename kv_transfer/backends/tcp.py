"""tcp: page bytes follow their descriptor on the control socket itself.

Per layer: descriptor frame + K/V bytes in one locked write on the sender; on the
receiver the reader thread reads them straight into a reusable chunk buffer, which the
endpoint checksums and scatters before reading the next chunk. Works anywhere; several
transfers share one link per endpoint and interleave layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from kv_transfer.base import TransferConfig
from kv_transfer.link import ControlLink
from kv_transfer.plane import Backend, SimpleHost
from kv_transfer.wire import byte_view
from proto import kv_transfer_pb2 as pb


class GrowBuffer:
    """A reusable uint8 buffer that grows to the largest size asked for."""

    def __init__(self, device: str = "cpu") -> None:
        self._device = device
        self._buf = torch.empty(0, dtype=torch.uint8, device=device)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        return self._buf[:nbytes]


class TcpSender:
    def __init__(self, link: ControlLink):
        self._link = link
        self._buf = GrowBuffer()

    def staging(self, nbytes: int) -> torch.Tensor:
        return self._buf.get(nbytes)

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        self._link.send(pb.Frame(pages=desc), byte_view(staging))

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        pass


class TcpReceiver:
    def __init__(self, link: ControlLink):
        self._link = link
        self._buf = GrowBuffer()

    def chunks(self, desc: pb.PageDescriptor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
        for size in sizes:
            chunk = self._buf.get(size)
            self._link.recv_into(byte_view(chunk))
            yield chunk

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        pass


def _connect(link: ControlLink, params: Mapping[str, str], config: TransferConfig) -> TcpSender:
    return TcpSender(link)


BACKEND = Backend(
    name="tcp",
    host=lambda config: SimpleHost(TcpReceiver),
    connect=_connect,
)
