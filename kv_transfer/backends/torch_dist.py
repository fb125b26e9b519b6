"""torch_dist: page bytes go through a 2-rank torch.distributed group per link.

Pairing: the endpoint hosts one TCPStore; for each sender link it hands out a group
key, and both sides build a ProcessGroupGloo (CPU caches) or ProcessGroupNCCL (CUDA)
over ``PrefixStore(key, store)``: receiver rank 0, sender rank 1. Per layer::

    sender: descriptor on the control link -> send() of each chunk (chunk_plan sizes)
    receiver: descriptor -> recv() of each chunk into a reusable buffer -> checksum + scatter

Using group objects directly (no ``init_process_group``) gives one group per
sender/receiver pair and lets one process hold many.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.backends.buffers import GrowBuffer, PingPong
from kv_transfer.base import TransferConfig
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.plane import Backend, ReceiverPlane
from kv_transfer.wire import payload_sizes
from proto import kv_transfer_pb2 as pb

_TAG = 7


def _group(store: dist.Store, key: str, rank: int, device: str, timeout: timedelta):
    prefixed = dist.PrefixStore(f"pdserve-kv/{key}", store)
    if device == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as exc:
        raise PeerLost(f"torch.distributed {what} failed: {exc}") from exc


def _chunks_of(tensor: torch.Tensor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
    offset = 0
    for size in sizes:
        yield tensor[offset : offset + size]
        offset += size


class DistSender:
    chunk_bytes = 4 << 20
    """Default message size: per-message cost is high here, so bigger than tcp's."""

    def __init__(self, link: ControlLink, group, device: str):
        self._link, self._group = link, group
        self._buffers = PingPong(device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return self._buffers.staging(nbytes)

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        """Post the sends and return; the buffer is reused only after they complete."""
        self._link.send(pb.Frame(pages=desc))
        sizes = payload_sizes(desc, desc.k_bytes // len(desc.block_ids))
        try:
            works = [self._group.send([c], 0, _TAG) for c in _chunks_of(staging, sizes)]
        except RuntimeError as exc:
            raise PeerLost(f"torch.distributed send failed: {exc}") from exc
        self._buffers.sent([lambda w=w: _wait(w, "send") for w in works])

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        self._group = None


class DistReceiver:
    def __init__(self, group, device: str):
        self._group = group
        self._bufs = (GrowBuffer(device), GrowBuffer(device))

    def chunks(self, desc: pb.PageDescriptor, sizes: Sequence[int]) -> Iterator[torch.Tensor]:
        # Double buffering: chunk i+1 is received while chunk i is checksummed and scattered.
        def post(i: int):
            chunk = self._bufs[i % 2].get(sizes[i])
            return chunk, self._group.recv([chunk], 1, _TAG)

        pending = post(0) if sizes else None
        for i in range(len(sizes)):
            chunk, work = pending
            _wait(work, "recv")
            if i + 1 < len(sizes):
                pending = post(i + 1)
            yield chunk

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        self._group = None


class DistHost:
    """Hosts the TCPStore every pair of this endpoint rendezvous through."""

    def __init__(self, config: TransferConfig):
        self._config = config
        self._timeout = timedelta(seconds=config.peer_timeout_s)
        self._store = dist.TCPStore(
            config.host,
            0,
            None,
            True,
            timeout=timedelta(seconds=config.connect_timeout_s),
            wait_for_workers=False,
        )

    def accept(
        self, link: ControlLink, hello: pb.Hello
    ) -> tuple[dict[str, str], Callable[[], ReceiverPlane]]:
        key = uuid.uuid4().hex
        device = self._config.plane.get("device", "cpu")
        params = {
            "host": self._config.host,
            "port": str(self._store.port),
            "key": key,
            "device": device,
        }
        return params, lambda: DistReceiver(
            _group(self._store, key, 0, device, self._timeout), device
        )

    def close(self) -> None:
        self._store = None


def _connect(link: ControlLink, params: Mapping[str, str], config: TransferConfig) -> DistSender:
    store = dist.TCPStore(
        params["host"],
        int(params["port"]),
        None,
        False,
        timeout=timedelta(seconds=config.connect_timeout_s),
    )
    timeout = timedelta(seconds=config.peer_timeout_s)
    group = _group(store, params["key"], 1, params["device"], timeout)
    return DistSender(link, group, params["device"])


BACKEND = Backend(name="torch_dist", host=DistHost, connect=_connect)
