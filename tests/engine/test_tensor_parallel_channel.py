"""The side channel between a TP group's leader and its followers (no processes: both
ends in threads over real sockets): requests and their answers or errors, one-way
messages, follower events, a connection without the group's token refused, and a lost
follower failing its pending requests and reported once."""

from __future__ import annotations

import threading

import pytest

from engine.parallel.channel import ChannelError, RankHub, RankLink
from tests.waiting import wait_until


@pytest.fixture
def pair():
    hub = RankHub("127.0.0.1", 2, "t0ken")
    link = RankLink(hub.address, 1, "t0ken")
    hub.wait_connected(10)
    yield hub, link
    link.close()
    hub.close()


def test_tensor_parallel_channel_requests_messages_and_events(pair):
    hub, link = pair
    got, events = [], []

    def boom(body):
        raise ValueError(f"cannot expect {body['n']} blocks")

    link.serve({"echo": lambda b: {"twice": 2 * b["n"]}, "note": got.append, "boom": boom})
    assert hub.request(1, "echo", {"n": 21}) == {"twice": 42}
    with pytest.raises(ChannelError, match="rank 1: ValueError: cannot expect 3 blocks"):
        hub.request(1, "boom", {"n": 3})
    assert hub.send(1, "note", {"x": 1})
    wait_until(lambda: got == [{"x": 1}], 5)
    link.emit("early", {"i": 0})  # before the leader listens: kept, then delivered
    hub.set_event_handler(lambda rank, kind, body: events.append((rank, kind, body)))
    link.emit("kv_done", {"i": 1})
    wait_until(lambda: len(events) == 2, 5)
    assert events == [(1, "early", {"i": 0}), (1, "kv_done", {"i": 1})]


def test_tensor_parallel_channel_refuses_a_connection_without_the_token():
    hub = RankHub("127.0.0.1", 2, "right")
    try:
        intruder = RankLink(hub.address, 1, "wrong")
        with pytest.raises(TimeoutError, match=r"ranks \[1\] never joined"):
            hub.wait_connected(0.5)
        with pytest.raises(ChannelError, match="rank 1 is not connected"):
            hub.request(1, "echo", {})
        intruder.close()
    finally:
        hub.close()


def test_tensor_parallel_channel_lost_rank_fails_its_requests(pair):
    hub, link = pair
    lost, entered = [], threading.Event()

    def hang(body):
        entered.set()
        threading.Event().wait(30)  # never answers: the follower dies meanwhile

    hub.on_lost = lost.append
    link.serve({"hang": hang})
    errors = []
    t = threading.Thread(target=lambda: errors.append(_fails(hub)))
    t.start()
    assert entered.wait(10)
    link.close()
    t.join(10)
    assert errors and "rank 1 left the channel" in errors[0]
    wait_until(lambda: lost == [1], 5)


def _fails(hub: RankHub) -> str:
    try:
        hub.request(1, "hang", {}, timeout_s=20)
    except ChannelError as exc:
        return str(exc)
    return "answered"
