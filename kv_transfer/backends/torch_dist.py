"""torch_dist: page bytes go through a 2-rank torch.distributed group per link.

Pairing: the endpoint hosts one TCPStore; for each sender link it hands out a group
key, and both sides build a ProcessGroupGloo (CPU caches) or ProcessGroupNCCL (CUDA)
over ``PrefixStore(key, store)``: receiver rank 0, sender rank 1. Per layer::

    sender:   descriptor on the control link -> one send() per message of at most
              msg_bytes (set by the receiver at pairing): a run of blocks consecutive on
              both sides straight from the source cache, the rest gathered into staging
              (kv_transfer/messages.py) -> returns; the staging buffer is reused once
              those sends complete (ping-pong)
    receiver: a ring of ``dist_ring`` receives of msg_bytes is always posted (gloo sends
              complete only against a posted receive) for staged messages -> checksum +
              scatter each -> re-post its buffer; a message whose destination blocks are
              consecutive (tag DIRECT) is received straight into them, posted when its
              descriptor arrives; a descriptor whose sizes do not fit the layout has its
              messages (sized from the descriptor, as the sender does) taken and dropped

Plane options: ``dist_msg_bytes`` (default 4 MiB, or TransferConfig.chunk_bytes),
``dist_ring`` (default 4), ``device`` (default: where the receiver's KV cache is;
``cpu`` -> gloo, ``cuda`` -> NCCL; the NCCL path is untested on this CPU-only box).

Using group objects directly (no ``init_process_group``) gives one group per
sender/receiver pair and lets one process hold many.
"""

from __future__ import annotations

import collections
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.backends.buffers import PingPong
from kv_transfer.base import EndpointArgs, TransferConfig
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.messages import receiver_direct, run_min_bytes
from kv_transfer.plane import NO_FENCE, Backend, Capabilities, ReceiverPlane, checksum_kind
from kv_transfer.wire import desc_plan, payload_sizes, skippable_sizes
from proto import kv_transfer_pb2 as pb

_TAG = 7
_DIRECT = 8
"""Messages received straight into the cache (messages.py), posted once their descriptor
is in; the others match the ring of receives posted ahead (``_TAG``)."""


def _group(store: dist.Store, key: str, rank: int, device: str, timeout: timedelta, host: str):
    prefixed = dist.PrefixStore(f"pdserve-kv/{key}", store)
    if device == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # gloo binds and advertises this address: this worker's own interface (config.host).
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
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


class _Poster:
    """A thread that performs the gloo sends in order.

    A gloo send writes the socket in the calling thread, so posting it from the writer
    thread would serialise gathering layer i+1 behind sending layer i.
    """

    def __init__(self, group) -> None:
        self._group = group
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="kv-dist-send", daemon=True).start()

    def submit(self, chunks: list[tuple[torch.Tensor, int]]) -> Callable[[], None]:
        """Queue the sends (tensor, tag); returns a wait() that raises PeerLost if one
        failed."""
        done, errors = threading.Event(), []
        self._queue.put((chunks, done, errors))

        def wait() -> None:
            done.wait()
            if errors:
                raise PeerLost(f"torch.distributed send failed: {errors[0]}")

        return wait

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunks, done, errors = item
            try:
                for chunk, tag in chunks:
                    if not errors:
                        self._group.send([chunk], 0, tag).wait()
            except RuntimeError as exc:
                errors.append(str(exc))
            finally:
                done.set()

    def close(self) -> None:
        self._queue.put(None)


class DistSender:
    """Sends each chunk as one message of at most ``chunk_bytes`` (the receiver's size)."""

    def __init__(
        self, link: ControlLink, group, device: str, msg_bytes: int, checksum: str, run_min: int
    ):
        self._link = link
        self.capabilities = Capabilities(
            chunk_bytes=msg_bytes, run_messages=True, run_min_bytes=run_min, checksum=checksum
        )
        """The message size is fixed by the receiver at pairing; it overrides
        TransferConfig.chunk_bytes."""
        self._buffers = PingPong(device)
        self._poster = _Poster(group)

    def staging(self, nbytes: int) -> torch.Tensor:
        return self._buffers.staging(nbytes)

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        """Queue the sends and return; the buffer is reused only after they complete."""
        self._link.send(pb.Frame(pages=desc))
        sizes = payload_sizes(desc, desc.k_bytes // len(desc.block_ids))
        chunks = [(c, _TAG) for c in _chunks_of(staging, sizes)]
        self._buffers.sent([self._poster.submit(chunks)])

    def send_messages(self, desc: pb.PageDescriptor, parts: list[torch.Tensor]) -> None:
        """The descriptor, then one message per part (messages.py) on its tag; staging is
        reused only after they complete, the cache views are the prefill's until SUCCESS."""
        self._link.send(pb.Frame(pages=desc))
        plan = desc_plan(desc, desc.k_bytes // len(desc.block_ids))
        tags = [_DIRECT if d else _TAG for d in receiver_direct(desc, plan)]
        self._buffers.sent([self._poster.submit(list(zip(parts, tags, strict=True)))])

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        self._poster.close()


class DistReceiver:
    """Keeps ``ring`` receives of ``msg_bytes`` posted at all times.

    gloo completes a send only once the matching receive is posted, so receives posted
    just in time would stall the sender on every descriptor round trip. A message
    shorter than the posted buffer is fine (gloo fills a prefix), so chunks are not
    padded.
    """

    def __init__(self, group, device: str, msg_bytes: int, ring: int, checksum: str):
        self._group, self._msg, self._device = group, msg_bytes, device
        self.capabilities = Capabilities(run_messages=True, checksum=checksum)
        self._slots: collections.deque = collections.deque()
        for _ in range(ring):
            self._post(torch.empty(msg_bytes, dtype=torch.uint8, device=device))

    def _post(self, buf: torch.Tensor) -> None:
        self._slots.append((buf, self._group.recv([buf], 1, _TAG)))

    def chunks(
        self, desc: pb.PageDescriptor, sizes: Sequence[int], targets=None
    ) -> Iterator[torch.Tensor]:
        """The descriptor's messages in order: DIRECT ones into ``targets`` (cache views;
        scratch where None), posted now, the rest from the ring."""
        plan = desc_plan(desc, desc.k_bytes // max(1, len(desc.block_ids)))
        direct = receiver_direct(desc, plan) if len(plan) == len(sizes) else [False] * len(sizes)
        ring = [s for s, d in zip(sizes, direct, strict=True) if not d]
        if max(ring, default=0) > self._msg:  # gloo fails a message longer than its buffer
            raise PeerLost(f"a {max(ring)}-byte message exceeds the paired size {self._msg}")
        posted = {i: self._post_direct(sizes[i], targets[i] if targets else None) for i, d in enumerate(direct) if d}  # fmt: skip
        for i, size in enumerate(sizes):
            if i in posted:
                buf, work = posted[i]
                _wait(work, "recv")
                yield buf
                continue
            buf, work = self._slots.popleft()
            _wait(work, "recv")
            try:
                yield buf[:size]
            finally:
                self._post(buf)  # the consumer is done with it: receive the next message

    def _post_direct(self, size: int, target: torch.Tensor | None):
        buf = target if target is not None else torch.empty(size, dtype=torch.uint8, device=self._device)  # fmt: skip
        return buf, self._group.recv([buf], 1, _DIRECT)

    def discard(self, desc: pb.PageDescriptor) -> None:
        for _ in self.chunks(desc, skippable_sizes(desc, self._msg)):
            pass

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        self._group = None


class DistHost:
    """Hosts the TCPStore every pair of this endpoint rendezvous through."""

    fence = NO_FENCE

    def __init__(self, args: EndpointArgs):
        config = self._config = args.config
        on_cuda = args.kv_caches[0][0].is_cuda
        self._device = config.plane.get("device") or ("cuda" if on_cuda else "cpu")
        # NCCL moves device memory over NVLink / InfiniBand, whose links check every
        # packet, and hashing device pages would copy them to the host; gloo crosses a
        # TCP wire (bench/RESULTS.md, "Integrity").
        self._checksum = checksum_kind(config, "none" if self._device == "cuda" else "xxh3")
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
        device = self._device
        msg = self._config.chunk_bytes or int(self._config.plane.get("dist_msg_bytes", 4 << 20))
        ring = int(self._config.plane.get("dist_ring", "4"))
        params = {
            "host": self._config.host,
            "port": str(self._store.port),
            "key": key,
            "device": device,
            "msg_bytes": str(msg),
            "checksum": self._checksum,
        }
        return params, lambda: DistReceiver(
            _group(self._store, key, 0, device, self._timeout, self._config.host),
            device, msg, ring, self._checksum,
        )  # fmt: skip

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
    group = _group(store, params["key"], 1, params["device"], timeout, config.host)
    checksum = params.get("checksum", "xxh3")
    msg = int(params["msg_bytes"])
    return DistSender(link, group, params["device"], msg, checksum, run_min_bytes(config))


BACKEND = Backend(name="torch_dist", host=DistHost, connect=_connect)
