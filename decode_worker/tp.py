"""Tensor parallelism on the decode side: every rank receives its own KV heads.

A reservation's transfer is cut into rank-to-rank parts for the prefill group's TP size
(kv_transfer/tp_map.py). The leader expects its own parts on its endpoints and the
others' on the followers' (``kv_expect`` over the side channel, answered with their
tickets), and tracks them as one :class:`GroupReceiver`::

    leader:   Reserve -> plan parts -> local parts: endpoint.expect(heads)
                                    -> rank r's parts: channel request kv_expect -> tickets
              GroupReceiver(all tickets) -> ReserveResponse.parts
    follower: kv_expect -> expect on its own endpoints (its cache) -> tickets
              a part ends -> event kv_done -> GroupReceiver -> (all ended) TransferDone
              kv_abort -> abort those parts (each still reports kv_done once it let go)

The engine frees the blocks (on the leader) only after every part ended.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.parallel.channel import ChannelError, RankHub, RankLink
from engine.security import ClusterSecret
from kv_transfer import KVEndpoint, OnDone, TransferState, make_endpoint
from kv_transfer.group import GroupReceiver, PartSet
from kv_transfer.tp_map import plan_parts
from kv_transfer.wire import ticket_from_pb, ticket_to_pb
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


def _frees_nothing(block_ids: list[int]) -> None:
    """The leader's engine frees a failed transfer's blocks once every part ended."""


def ticket_hex(ticket) -> str:
    return ticket_to_pb(ticket).SerializeToString().hex()


def ticket_of_hex(text: str):
    return ticket_from_pb(pb.TransferTicket.FromString(bytes.fromhex(text)))


class TPReceivers:
    """The leader's side: expects every part of a transfer, on whichever rank holds it."""

    def __init__(
        self, engine: LLMEngine, endpoints: dict[str, KVEndpoint], hub: RankHub | None
    ) -> None:
        """``hub``: the group's side channel (``None`` on a single rank, whose parts, one
        per prefill rank, are all its own)."""
        self.engine, self.endpoints, self.hub = engine, endpoints, hub
        self._lock = threading.Lock()
        self._remote: dict[str, GroupReceiver] = {}
        """A follower's part -> its transfer's group (until the part reports its end)."""
        self._early: dict[str, tuple[str, str | None]] = {}
        """Ends reported before the part's ticket came back (a lease that ran out at once)."""
        if hub is not None:
            hub.set_event_handler(self._on_event)
            hub.on_lost = self._on_lost

    def expect(
        self, transport: str, block_ids, lease_s: float, on_done: OnDone, prefill_tp: int
    ) -> GroupReceiver:
        """Every part of one transfer from a prefill group of ``prefill_tp`` ranks."""
        parts = plan_parts(self.engine.spec.num_kv_heads, prefill_tp, self.engine.tp_size)
        group = GroupReceiver(PartSet(on_done), self._abort_remote)
        try:
            self._expect_local(group, transport, block_ids, lease_s, [p for p in parts if p.dst_rank == 0])  # fmt: skip
            for rank in sorted({p.dst_rank for p in parts} - {0}):
                mine = [[p.src_rank, *p.heads] for p in parts if p.dst_rank == rank]
                body = {"transport": transport, "blocks": list(block_ids), "lease_s": lease_s, "parts": mine}  # fmt: skip
                reply = self.hub.request(rank, "kv_expect", body)
                for text in reply["tickets"]:
                    self._add_remote(group, ticket_of_hex(text), rank)
        except (ChannelError, KeyError, ValueError) as exc:
            group.abort(f"reservation failed: {exc}")
            raise RuntimeError(f"a TP rank could not expect its KV part: {exc}") from None
        group.parts.seal()
        return group

    def _add_remote(self, group: GroupReceiver, ticket, rank: int) -> None:
        with self._lock:
            self._remote[ticket.transfer_id] = group
            early = self._early.pop(ticket.transfer_id, None)
        group.add_remote(ticket, rank)
        if early is not None:
            self._on_event(rank, "kv_done", {"transfer_id": ticket.transfer_id, "state": early[0], "error": early[1]})  # fmt: skip

    def _expect_local(self, group, transport, block_ids, lease_s, parts) -> None:
        endpoint, receivers = self.endpoints[transport], {}

        def done(transfer_id: str, state: TransferState) -> None:
            rx = receivers.get(transfer_id)
            group.parts.update(transfer_id, state, rx.error if rx is not None else None)

        for part in parts:
            rx = endpoint.expect(block_ids, lease_s, done, part.heads, part.src_rank)
            receivers[rx.ticket.transfer_id] = rx
            group.add_local(rx)

    def _abort_remote(self, parts: dict[str, int], reason: str) -> None:
        for rank in sorted(set(parts.values())):
            tids = [t for t, r in parts.items() if r == rank]
            self.hub.send(rank, "kv_abort", {"transfer_ids": tids, "reason": reason})

    def _on_event(self, rank: int, kind: str, body: dict) -> None:
        if kind != "kv_done":
            return
        tid = body["transfer_id"]
        with self._lock:
            group = self._remote.pop(tid, None)
            if group is None:
                self._early[tid] = (body["state"], body.get("error"))
                return
        group.parts.update(tid, TransferState(body["state"]), body.get("error"))

    def _on_lost(self, rank: int) -> None:
        with self._lock:
            groups = set(self._remote.values())
        for group in groups:
            group.rank_lost(rank, f"TP rank {rank} left the group")


class DecodeFollower:
    """A follower rank's side: endpoints on its own cache, parts expected on request."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        tcfg = replace(config.transfer, host=config.host, secret=config.transfer.secret or secret)
        self.endpoints = {
            name: make_endpoint(
                name,
                engine.layout,
                engine.kv_caches,
                engine.rank_layout_spec,
                _frees_nothing,
                config=tcfg,
            )  # fmt: skip
            for name in config.kv_transports
        }
        self.link: RankLink = engine.parallel.channel
        self._lock = threading.Lock()
        self._parts: dict = {}
        self.link.serve({"kv_expect": self._expect, "kv_abort": self._abort})

    def _expect(self, body: dict) -> dict:
        endpoint, tickets = self.endpoints[body["transport"]], []
        for src, h0, h1 in body["parts"]:
            rx = endpoint.expect(body["blocks"], body["lease_s"], self._done, (h0, h1), src)
            with self._lock:
                self._parts[rx.ticket.transfer_id] = rx
            tickets.append(ticket_hex(rx.ticket))
        return {"tickets": tickets}

    def _abort(self, body: dict) -> None:
        for tid in body["transfer_ids"]:
            with self._lock:
                rx = self._parts.get(tid)
            if rx is not None:
                rx.abort(body.get("reason", "aborted by the leader"))

    def _done(self, transfer_id: str, state: TransferState) -> None:
        with self._lock:
            rx = self._parts.pop(transfer_id, None)
        error = rx.error if rx is not None else None
        self.link.emit("kv_done", {"transfer_id": transfer_id, "state": state.value, "error": error})  # fmt: skip

    def step_hook(self, msg):
        return None  # the KV arrives by transfer; nothing leaves a decode rank per layer

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            endpoint.close()
