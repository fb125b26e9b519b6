"""ucx: page bytes go over UCX (ucxx) tagged messages, one UCX endpoint per link.

Pairing: the endpoint runs one ucxx listener (port 0). For each sender link it hands
out a one-time token (only once the sender passed the control-link handshake); the
sender connects to the listener and sends the token first, so the listener can bind the
new UCX endpoint to that control link. A connection that sends no token within
``handshake_timeout_s`` is closed. Per layer::

    sender:   gather + checksum into staging buffer A -> descriptor on the control link
              -> ucx sends of its chunks (default 4 MiB) posted on the loop, in order
              -> returns; the next layer goes into buffer B (ping-pong), A is reused
              once its sends completed
    receiver: descriptor -> ucx recv of chunk i+1 posted while chunk i is checksummed
              and scattered (double buffering)
    a descriptor whose sizes do not fit the layout: its messages, sized as the sender
              sizes them from the descriptor, are received into scratch and dropped

ucxx runs on one asyncio loop in a daemon thread per process. Transports come from the
plane options ``ucx_tls`` / ``ucx_net_devices``, else the UCX_TLS / UCX_NET_DEVICES
environment, else ``tcp`` on ``lo`` (works on any host, no GPU or RDMA needed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from kv_transfer.backends.buffers import GrowBuffer, PingPong
from kv_transfer.base import TransferConfig
from kv_transfer.link import ControlLink, PeerLost
from kv_transfer.messages import receiver_direct, run_min_bytes
from kv_transfer.plane import NO_FENCE, Backend, Capabilities, ReceiverPlane
from kv_transfer.wire import MAX_SKIP_MESSAGE_BYTES, desc_plan, payload_sizes, skippable_sizes
from proto import kv_transfer_pb2 as pb

logger = logging.getLogger(__name__)


def _buffer(chunk: torch.Tensor):
    return chunk if chunk.is_cuda else chunk.numpy()


class UcxLoop:
    """The process's ucxx event loop thread; ``run`` submits a coroutine and waits."""

    _instance: UcxLoop | None = None
    _guard = threading.Lock()

    @classmethod
    def get(cls, config: TransferConfig) -> UcxLoop:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls(config)
            return cls._instance

    def __init__(self, config: TransferConfig):
        import ucxx  # the optional dependency: pip install ucxx-cu12

        self.ucxx = ucxx
        options = {
            "TLS": config.plane.get("ucx_tls") or os.environ.get("UCX_TLS", "tcp"),
            "NET_DEVICES": config.plane.get("ucx_net_devices")
            or os.environ.get("UCX_NET_DEVICES", "lo"),
        }
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="kv-ucx", daemon=True).start()
        self.run(self._init(options), timeout=config.connect_timeout_s)
        logger.info("ucxx %s initialised with %s", ucxx.get_ucx_version(), options)

    async def _init(self, options: dict[str, str]) -> None:
        self.ucxx.init(options=options)

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float):
        return self.wait(self.submit(coro), timeout)

    def wait(self, future: concurrent.futures.Future, timeout: float):
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PeerLost(f"ucx operation timed out after {timeout}s") from None
        except self.ucxx.exceptions.UCXError as exc:
            raise PeerLost(f"ucx: {exc}") from exc


async def _make_lock() -> asyncio.Lock:
    return asyncio.Lock()


_DIRECT = 1
"""The ucxx tag of messages received straight into the cache (messages.py); the others
keep the endpoint's default tag."""


class UcxSender:
    def __init__(self, link: ControlLink, ucx: UcxLoop, ep, timeout: float, run_min: int):
        self._link, self._ucx, self._ep, self._timeout = link, ucx, ep, timeout
        self.capabilities = Capabilities(
            default_chunk_bytes=4 << 20, run_messages=True, run_min_bytes=run_min
        )
        """Default message size: per-message cost is high here, so bigger than tcp's."""
        self._buffers = PingPong()
        self._order = ucx.run(_make_lock(), timeout)

    def staging(self, nbytes: int) -> torch.Tensor:
        return self._buffers.staging(nbytes)

    def send(self, desc: pb.PageDescriptor, staging: torch.Tensor) -> None:
        """Post the sends and return; the buffer is reused only after they complete."""
        self._link.send(pb.Frame(pages=desc))
        sizes = payload_sizes(desc, desc.k_bytes // len(desc.block_ids))

        async def send_all() -> None:
            async with self._order:  # FIFO: layers go out in the order they were posted
                offset = 0
                for size in sizes:
                    await self._ep.send(_buffer(staging[offset : offset + size]))
                    offset += size

        future = self._ucx.submit(send_all())
        self._buffers.sent([lambda: self._ucx.wait(future, self._timeout)])

    def send_messages(self, desc: pb.PageDescriptor, parts: list[torch.Tensor]) -> None:
        """The descriptor, then every part posted at once (messages.py: ucx overlaps them),
        each on its tag; staging is reused only after they complete."""
        self._link.send(pb.Frame(pages=desc))
        plan = desc_plan(desc, desc.k_bytes // len(desc.block_ids))
        tags = [_DIRECT if d else None for d in receiver_direct(desc, plan)]

        async def send_all() -> None:
            async with self._order:  # FIFO: posted in order, so matched in order per tag
                await asyncio.gather(*(self._ep.send(_buffer(p), tag=t) for p, t in zip(parts, tags, strict=True)))  # fmt: skip

        future = self._ucx.submit(send_all())
        self._buffers.sent([lambda: self._ucx.wait(future, self._timeout)])

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        try:
            self._ucx.run(self._ep.close(), timeout=self._timeout)
        except Exception as exc:  # the peer may already be gone
            logger.debug("ucx close: %s", exc)


class UcxReceiver:
    capabilities = Capabilities(run_messages=True)

    def __init__(self, ucx: UcxLoop, ep, done: asyncio.Event, timeout: float):
        self._ucx, self._ep, self._done, self._timeout = ucx, ep, done, timeout
        self._bufs = (GrowBuffer(), GrowBuffer())

    def chunks(
        self, desc: pb.PageDescriptor, sizes: Sequence[int], targets=None
    ) -> Iterator[torch.Tensor]:
        """DIRECT messages posted at once into ``targets`` (cache views; scratch where
        None); the staged ones double-buffered: chunk i+1 posted while i is consumed."""
        plan = desc_plan(desc, desc.k_bytes // max(1, len(desc.block_ids)))
        direct = receiver_direct(desc, plan) if len(plan) == len(sizes) else [False] * len(sizes)
        posted = {}
        for i, d in enumerate(direct):
            if d:
                buf = targets[i] if targets and targets[i] is not None else torch.empty(sizes[i], dtype=torch.uint8)  # fmt: skip
                posted[i] = (buf, self._ucx.submit(self._ep.recv(_buffer(buf), tag=_DIRECT)))
        staged = [i for i, d in enumerate(direct) if not d]

        def post(k: int) -> tuple[torch.Tensor, concurrent.futures.Future]:
            chunk = self._bufs[k % 2].get(sizes[staged[k]])
            return chunk, self._ucx.submit(self._ep.recv(_buffer(chunk)))

        pending, k = (post(0) if staged else None), 0
        for i in range(len(sizes)):
            if i in posted:
                chunk, future = posted[i]
            else:
                (chunk, future), k = pending, k + 1
                if k < len(staged):
                    pending = post(k)  # before waiting: it overlaps this one
            self._ucx.wait(future, self._timeout)
            yield chunk

    def discard(self, desc: pb.PageDescriptor) -> None:
        sizes = skippable_sizes(desc, MAX_SKIP_MESSAGE_BYTES)
        for _ in self.chunks(desc, sizes):
            pass

    def on_frame(self, frame: pb.Frame) -> bool:
        return False

    def close(self) -> None:
        self._ucx.loop.call_soon_threadsafe(self._done.set)


class UcxHost:
    """One ucxx listener per endpoint; binds incoming UCX endpoints to links by token."""

    fence = NO_FENCE

    def __init__(self, config: TransferConfig):
        self._config = config
        self._ucx = UcxLoop.get(config)
        self._pending: dict[bytes, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._handlers: set[asyncio.Task] = set()  # touched on the loop thread only
        self._listener = self._ucx.run(self._listen(), timeout=config.connect_timeout_s)

    async def _listen(self):
        return self._ucx.ucxx.create_listener(self._on_endpoint, port=0)

    async def _on_endpoint(self, ep) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve(ep)
        finally:
            self._handlers.discard(task)

    async def _serve(self, ep) -> None:
        token = torch.empty(16, dtype=torch.uint8)
        try:  # anyone can reach the listener: a silent connection must not stay forever
            await asyncio.wait_for(ep.recv(token.numpy()), self._config.handshake_timeout_s)
        except asyncio.TimeoutError:
            token.fill_(0)  # never a pending token (those are uuid4 bytes)
        with self._lock:
            future = self._pending.pop(bytes(token.numpy()), None)
        if future is None:
            logger.warning("ucx listener: a connection without a valid token, closing it")
            await ep.close()
            return
        done = asyncio.Event()
        future.set_result((ep, done))
        await done.wait()  # keep the handler (and so the endpoint) alive until the link ends
        await ep.close()

    def _ucx_host(self) -> str:
        """The address senders dial for UCX (plane option ``ucx_host`` overrides).

        The listener binds 0.0.0.0, but with UCX's tcp transport on ``lo`` only the
        interface's own address (127.0.0.1) completes the wireup: dialing another
        loopback address such as 127.0.0.2 fails with "Endpoint is not connected".
        """
        host = self._config.plane.get("ucx_host") or self._config.host
        return "127.0.0.1" if host.startswith("127.") else host

    def accept(
        self, link: ControlLink, hello: pb.Hello
    ) -> tuple[dict[str, str], Callable[[], ReceiverPlane]]:
        token = uuid.uuid4().bytes
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending[token] = future
        params = {"host": self._ucx_host(), "port": str(self._listener.port), "token": token.hex()}

        def finish() -> ReceiverPlane:
            try:
                ep, done = future.result(self._config.connect_timeout_s)
            except concurrent.futures.TimeoutError:
                with self._lock:
                    self._pending.pop(token, None)
                raise PeerLost("sender never connected to the ucx listener") from None
            return UcxReceiver(self._ucx, ep, done, self._config.peer_timeout_s)

        return params, finish

    def close(self) -> None:
        """Let the handlers close their endpoints, then close the listener."""

        async def shutdown() -> None:
            if self._handlers:
                await asyncio.wait(set(self._handlers), timeout=self._config.peer_timeout_s)
            self._listener.close()

        try:
            self._ucx.run(shutdown(), timeout=self._config.peer_timeout_s + 1)
        except PeerLost as exc:
            logger.warning("ucx listener shutdown: %s", exc)


def _connect(link: ControlLink, params: Mapping[str, str], config: TransferConfig) -> UcxSender:
    ucx = UcxLoop.get(config)
    timeout = config.connect_timeout_s

    async def connect():
        ep = await ucx.ucxx.create_endpoint(params["host"], int(params["port"]))
        token = torch.frombuffer(bytearray(bytes.fromhex(params["token"])), dtype=torch.uint8)
        await ep.send(token.numpy())
        return ep

    ep = ucx.run(connect(), timeout)
    return UcxSender(link, ucx, ep, config.peer_timeout_s, run_min_bytes(config))


BACKEND = Backend(name="ucx", host=lambda args: UcxHost(args.config), connect=_connect)
