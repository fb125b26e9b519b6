"""Property-based fuzz of a paired KV link (tcp): a sender that completed the handshake
then writes any sequence of frames (descriptors aimed at a real transfer, with payloads
and trailers of any size, and every other frame kind) and bytes. Whatever it sends, the
endpoint never crashes a reader thread, never allocates a data-path buffer larger than
one layer of its cache (or its 1 MiB skip buffer), frees the transfer's blocks once it
fails, and keeps serving other senders bit-exact (``round_trip``)."""

from __future__ import annotations

import logging

from hypothesis import event, given
from hypothesis import strategies as st

from kv_transfer import TransferState, wire
from kv_transfer.backends import buffers
from kv_transfer.link import ControlLink
from kv_transfer.pairing import sender_handshake
from proto import kv_transfer_pb2 as pb
from tests.fuzzing import budget

from . import hostile
from .conftest import FAST, wait_until
from .fuzz_frames import SHORT, U32S, U64S, frames
from .hostile import connect, round_trip

served = hostile.served  # the fixture: an in-process tcp endpoint, 1 s handshake deadline
SKIP_BYTES = 1 << 20


def _block_ids(ticket) -> st.SearchStrategy[list[int]]:
    ids = list(ticket.block_ids)
    return st.one_of(
        st.just(ids),
        st.permutations(ids).flatmap(lambda p: st.integers(1, len(p)).map(lambda n: p[:n])),
        st.just(ids + ids[:1]),  # a block twice
        st.lists(U32S, max_size=8),
        st.integers(0, 63).flatmap(lambda b: st.integers(65, 20000).map(lambda n: [b] * n)),
    )


@st.composite
def aimed(draw, ticket, layout) -> list[bytes]:
    """One descriptor aimed (mostly) at ``ticket``'s transfer, its payload and trailer."""
    block_ids = draw(_block_ids(ticket))
    n, bb = len(block_ids), layout.block_bytes
    k = draw(st.one_of(st.just(n * bb), st.just(n * bb + 1), U64S))
    desc = pb.PageDescriptor(
        transfer_id=draw(st.one_of(st.just(ticket.transfer_id), SHORT)),
        epoch=draw(st.one_of(st.just(ticket.epoch), U64S)),
        layer=draw(st.one_of(st.integers(0, layout.num_layers - 1), U32S)),
        block_ids=block_ids, k_bytes=k, v_bytes=draw(st.one_of(st.just(k), U64S)),
        checksum=draw(U64S), chunk_bytes=draw(st.one_of(st.just(FAST.chunk_bytes), U64S)),
        checksum_in_trailer=draw(st.booleans()),
    )  # fmt: skip
    announced = desc.k_bytes + desc.v_bytes
    size = draw(st.one_of(st.just(announced), st.integers(0, 4096)) if announced < 1 << 16 else st.integers(0, 4096))  # fmt: skip
    payload = draw(st.randoms(use_true_random=False)).randbytes(size)
    out = [wire.encode_frame(pb.Frame(pages=desc)), payload]
    if draw(st.booleans()):
        check = wire.Checksum()
        check.update(memoryview(payload))
        right = draw(st.booleans())
        trailer = pb.PageTrailer(transfer_id=desc.transfer_id, layer=desc.layer, checksum=check.value() if right else draw(U64S))  # fmt: skip
        out.append(wire.encode_frame(pb.Frame(trailer=trailer)))
    return out


@st.composite
def sessions(draw, ticket, layout) -> list[bytes]:
    opened = draw(st.booleans())
    start = [wire.encode_frame(pb.Frame(open=pb.Open(transfer_id=ticket.transfer_id, epoch=ticket.epoch)))] if opened else []  # fmt: skip
    items = draw(st.lists(st.one_of(
        aimed(ticket, layout), frames().map(lambda f: [wire.encode_frame(f)]),
        st.binary(max_size=32).map(lambda b: [b]),
    ), max_size=5))  # fmt: skip
    event(f"opened={opened}")
    return start + [piece for item in items for piece in item]


def _pair(address: str, spec) -> ControlLink:
    link = ControlLink(connect(address), "fuzz-sender", FAST.heartbeat_s, FAST.peer_timeout_s)
    hello = pb.Hello(spec=wire.spec_to_pb(spec), backend="tcp", sender_id="fuzz")
    sender_handshake(link, address, hello, None, 5.0)
    return link


def _play(link: ControlLink, session: list[bytes]) -> None:
    try:
        for piece in session:
            link.sock.sendall(piece)
    except OSError:
        pass  # the endpoint closed this link: allowed, it is this peer's own
    finally:
        link.close()


def test_fuzz_paired_sender_cannot_break_the_endpoint(served, caplog, monkeypatch):
    endpoint, client, pool, layout = served
    caplog.set_level(logging.WARNING, logger="kv_transfer")
    largest = [0]
    real_get = buffers.GrowBuffer.get

    def get(self, nbytes):
        largest[0] = max(largest[0], nbytes)
        return real_get(self, nbytes)

    monkeypatch.setattr(buffers.GrowBuffer, "get", get)
    client.connect(endpoint.address)  # an honest sender's link, paired beforehand

    @budget(100)
    @given(st.data())
    def paired_peer(data):
        ids = pool.allocate(data.draw(st.integers(1, 4)))
        rx = endpoint.expect(ids, lease_s=30)
        try:  # a draw may end the example (hypothesis' StopTest): clean up anyway
            session = data.draw(sessions(rx.ticket, layout))
            _play(_pair(endpoint.address, client.spec), session)
        finally:
            rx.abort("the fuzz session ended")
            if rx.poll() is TransferState.SUCCESS:  # blocks now belong to the engine
                pool.free(ids)
            wait_until(lambda: pool.num_free == pool.total, timeout=10)
        event(f"transfer {rx.poll().value}: {(rx.error or '')[:30]}")

    paired_peer()
    crashed = [r.getMessage() for r in caplog.records if "crash" in r.getMessage()]
    assert not crashed, crashed
    cap = max(SKIP_BYTES, layout.num_blocks * layout.block_bytes)
    assert largest[0] <= cap, f"a peer made the endpoint allocate {largest[0]} bytes (cap {cap})"
    round_trip(endpoint, client, pool, layout)
    assert hostile.pairs_at(client.spec, endpoint.address)


def test_fuzz_descriptor_naming_more_blocks_than_the_cache_is_refused(served, monkeypatch):
    """Regression (found writing the fuzzer; its long profile hits it): a descriptor
    repeating one block id 20,000 times with matching byte counts passed the size check,
    and dropping its payload buffered 20,000 blocks' worth at once (5 MiB on this 64-block
    cache; gigabytes on a real one). Now it is a bad descriptor: skipped, link closed
    (its payload is over a layer), and nothing of that size is allocated."""
    endpoint, client, pool, layout = served
    largest = [0]
    real_get = buffers.GrowBuffer.get
    monkeypatch.setattr(buffers.GrowBuffer, "get", lambda self, n: (largest.__setitem__(0, max(largest[0], n)), real_get(self, n))[1])  # fmt: skip
    n, bb = 20000, layout.block_bytes
    link = _pair(endpoint.address, client.spec)
    desc = pb.PageDescriptor(transfer_id="nobody", layer=0, block_ids=[3] * n, k_bytes=n * bb, v_bytes=n * bb, chunk_bytes=1 << 40)  # fmt: skip
    link.send(pb.Frame(pages=desc))
    wait_until(lambda: link_closed(link), timeout=10)
    link.close()
    assert largest[0] <= layout.num_blocks * bb
    round_trip(endpoint, client, pool, layout)


def link_closed(link: ControlLink) -> bool:
    return hostile.closed_by_peer(link.sock)
