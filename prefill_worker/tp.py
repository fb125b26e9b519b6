"""Tensor parallelism on the prefill side: every rank sends its own KV heads.

A ticket in parts (a TP group on either side, kv_transfer/tp_map.py) names the prefill
rank of each part. The leader opens its own parts and asks each follower to open its
(``kv_open`` over the side channel), and tracks them as one :class:`GroupSender`; the
followers send their parts' heads after each layer of the request's final chunk, from
the step the leader broadcast::

    leader:   Prefill(parts) -> local parts: client.open -> GroupSender (its heads)
                             -> rank r's parts: channel request kv_open
              KV hook, each layer: GroupSender.send_layer (its parts only)
    follower: kv_open -> client.open on its own links -> job table
              each step: for the leader's items of its jobs, after each layer of the
              final chunk, send that layer's heads; then finish
              a part ends -> event kv_done -> GroupSender -> (all ended) TransferDone
              kv_abort -> abort those parts
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.kv_cache.layout import head_view
from engine.parallel.channel import ChannelError, RankHub, RankLink
from engine.parallel.step_sync import StepMessage
from engine.security import ClusterSecret
from kv_transfer import KVClient, OnDone, TransferState, TransferTicket, make_client
from kv_transfer.group import GroupSender, PartSet
from kv_transfer.tp_map import part_heads
from kv_transfer.wire import ticket_from_pb, ticket_to_pb
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


def ticket_hex(ticket: TransferTicket) -> str:
    return ticket_to_pb(ticket).SerializeToString().hex()


def ticket_of_hex(text: str) -> TransferTicket:
    return ticket_from_pb(pb.TransferTicket.FromString(bytes.fromhex(text)))


def local_heads(engine: LLMEngine, ticket: TransferTicket) -> tuple[int, int]:
    """The slice of this rank's cache heads a part carries."""
    h0, h1 = part_heads(ticket, engine.rank_layout_spec)
    return h0 - engine.heads[0], h1 - engine.heads[0]


def _open_local(engine, client: KVClient, group: GroupSender, tickets) -> None:
    senders = {}

    def done(transfer_id: str, state: TransferState) -> None:
        tx = senders.get(transfer_id)
        group.parts.update(transfer_id, state, tx.error if tx is not None else None)

    try:
        for ticket in tickets:
            tx = client.open(ticket, on_done=done)
            senders[ticket.transfer_id] = tx
            group.add_local(tx, local_heads(engine, ticket))
    except BaseException as exc:  # refused or unreachable: the parts opened so far go too
        for tx in senders.values():
            tx.abort(f"another part of the transfer could not open: {exc}")
        raise


class TPSenders:
    """The leader's side: opens every part of a transfer on whichever rank sends it."""

    def __init__(self, engine: LLMEngine, hub: RankHub | None) -> None:
        self.engine, self.hub = engine, hub
        self._lock = threading.Lock()
        self._remote: dict[str, GroupSender] = {}
        if hub is not None:
            hub.set_event_handler(self._on_event)
            hub.on_lost = self._on_lost

    def open(self, client: KVClient, tickets, job: dict, on_done: OnDone) -> GroupSender:
        """``job``: request id, prompt length and cached blocks (what a follower needs
        to send its parts)."""
        tp = self.engine.tp_size
        bad = [t.src_rank for t in tickets if t.src_rank >= tp]
        if bad:
            raise ValueError(
                f"the ticket has parts for prefill rank {bad[0]} but this worker has "
                f"tp_size={tp}; the decode worker planned for another prefill TP size"
            )
        group = GroupSender(PartSet(on_done), self._abort_remote)
        _open_local(self.engine, client, group, [t for t in tickets if t.src_rank == 0])
        for rank in sorted({t.src_rank for t in tickets} - {0}):
            mine = [t for t in tickets if t.src_rank == rank]
            with self._lock:
                self._remote.update({t.transfer_id: group for t in mine})
            for t in mine:
                group.add_remote(t, rank)
            try:
                self.hub.request(rank, "kv_open", {**job, "tickets": [ticket_hex(t) for t in mine]})
            except ChannelError as exc:
                why = f"TP rank {rank} could not open its KV part: {exc}"
                group.rank_lost(rank, why)  # it reports none of them (a sender only reads)
                group.abort(why)
        group.parts.seal()
        return group

    def _abort_remote(self, parts: dict[str, int], reason: str) -> None:
        for rank in sorted(set(parts.values())):
            tids = [t for t, r in parts.items() if r == rank]
            self.hub.send(rank, "kv_abort", {"transfer_ids": tids, "reason": reason})

    def _on_event(self, rank: int, kind: str, body: dict) -> None:
        if kind != "kv_done":
            return
        with self._lock:
            group = self._remote.pop(body["transfer_id"], None)
        if group is not None:
            group.parts.update(body["transfer_id"], TransferState(body["state"]), body.get("error"))

    def _on_lost(self, rank: int) -> None:
        with self._lock:
            groups = set(self._remote.values())
        for group in groups:
            group.rank_lost(rank, f"TP rank {rank} left the group")


@dataclass
class _Job:
    """A follower's parts of one request."""

    prompt_len: int
    num_cached_blocks: int
    senders: list = field(default_factory=list)
    heads: list = field(default_factory=list)


class PrefillFollower:
    """A follower rank's side: opens its parts on request, sends their heads each layer."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        self.engine = engine
        self._transfer = replace(config.transfer, host=config.host, secret=config.transfer.secret or secret)  # fmt: skip
        self._clients: dict[str, KVClient] = {}
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._live: dict[str, tuple[str, object]] = {}
        """A part that has not ended -> (request id, its sender)."""
        self._opening: dict[str, bool] = {}
        """A part being opened -> whether it ended meanwhile."""
        self.link: RankLink = engine.parallel.channel
        self.link.serve({"kv_open": self._open, "kv_abort": self._abort})

    def _client(self, backend: str) -> KVClient:
        if backend not in self._clients:
            spec = self.engine.rank_layout_spec
            self._clients[backend] = make_client(backend, spec, config=self._transfer)
        return self._clients[backend]

    def _open(self, body: dict) -> None:
        rid, client = body["request_id"], self._client(body["backend"])
        job = _Job(body["prompt_len"], body["num_cached_blocks"])
        with self._lock:
            self._jobs[rid] = job
        for text in body["tickets"]:
            ticket = ticket_of_hex(text)
            tid = ticket.transfer_id
            with self._lock:
                self._opening[tid] = False
            tx = client.open(ticket, on_done=self._done)
            job.senders.append(tx)
            job.heads.append(local_heads(self.engine, ticket))
            with self._lock:
                ended = self._opening.pop(tid)
                if not ended:
                    self._live[tid] = (rid, tx)
            if ended:
                self._emit(tid, tx)
        with self._lock:
            if not any(r == rid for r, _ in self._live.values()):
                self._jobs.pop(rid, None)  # every part ended already

    def _abort(self, body: dict) -> None:
        with self._lock:
            live = [self._live[t][1] for t in body["transfer_ids"] if t in self._live]
        for tx in live:
            tx.abort(body.get("reason", "aborted by the leader"))

    def _done(self, transfer_id: str, state: TransferState) -> None:
        with self._lock:
            if transfer_id in self._opening:  # still in open(): reported when it returns
                self._opening[transfer_id] = True
                return
            rid, tx = self._live.pop(transfer_id, (None, None))
            if rid is not None and not any(r == rid for r, _ in self._live.values()):
                self._jobs.pop(rid, None)
        if tx is not None:
            self._emit(transfer_id, tx)

    def _emit(self, transfer_id: str, tx) -> None:
        self.link.emit("kv_done", {"transfer_id": transfer_id, "state": tx.poll().value, "error": tx.error})  # fmt: skip

    def step_hook(self, msg: StepMessage):
        with self._lock:
            work = [(i, self._jobs[i.request_id]) for i in msg.items if i.request_id in self._jobs]
        work = [(i, j) for i, j in work if i.end_pos >= j.prompt_len]  # the final chunk only
        if not work:
            return None
        caches, last = self.engine.kv_caches, self.engine.layout.num_layers - 1

        def send(layer: int) -> None:
            k, v = caches[layer]
            for item, job in work:
                src = item.block_ids[job.num_cached_blocks :][
                    : len(job.senders[0].ticket.block_ids)
                ]
                for tx, heads in zip(job.senders, job.heads, strict=True):
                    try:
                        tx.send_layer(
                            layer, head_view(k, heads), head_view(v, heads), src_block_ids=src
                        )
                        if layer == last:
                            tx.finish()
                    except Exception as exc:  # this part fails alone, never the step
                        logger.exception(
                            "TP rank %d: sending layer %d failed", self.link.rank, layer
                        )
                        tx.abort(f"TP rank {self.link.rank} could not send layer {layer}: {exc}")

        return send

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
