"""One transfer between TP groups, seen from a group's leader as one sender or receiver.

A transfer between a prefill group and a decode group is several rank-to-rank *parts*
(kv_transfer/tp_map.py), each an ordinary transfer with its own ticket. On each side the
leader holds a :class:`GroupSender` / :class:`GroupReceiver` over all of them: its own
parts are transfers of its own rank, the others' run on the follower ranks, which report
each part's end over the group's side channel (:meth:`PartSet.update`)::

    part ends (local on_done, or a follower's event) -> PartSet.update
        first FAILED -> abort every other part (local directly, remote through the
                        channel), so the group ends fast
        every part terminal -> on_done(first ticket's id, SUCCESS | FAILED), once

On FAILED the group reports only once every part is terminal: no rank writes (or reads)
the blocks any more when the owner frees them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from engine.kv_cache.layout import head_view
from kv_transfer.base import (
    KVReceiver,
    KVSender,
    OnDone,
    TransferState,
    TransferTicket,
    TransferTimings,
    report_done,
)

S = TransferState
AbortRemote = Callable[[dict[str, int], str], None]
"""``abort_remote({transfer_id: rank}, reason)``: tell follower ranks to abort parts."""


class PartSet:
    """The states of a transfer's parts; thread-safe. Parts are added, then the set is
    sealed: only a sealed set reports its end."""

    def __init__(self, on_done: OnDone | None) -> None:
        self._on_done = on_done
        self._lock = threading.Lock()
        self.tickets: list[TransferTicket] = []
        self._states: dict[str, TransferState] = {}
        self._error: str | None = None
        self._sealed = self._reported = False
        self.abort_rest: Callable[[str], None] = lambda reason: None

    @property
    def ticket(self) -> TransferTicket:
        return self.tickets[0]

    def add(
        self, ticket: TransferTicket, state: TransferState = S.BOOTSTRAPPING, error=None
    ) -> None:
        """A part, and its state now (it may have ended while it was being opened)."""
        with self._lock:
            self.tickets.append(ticket)
            self._states.setdefault(ticket.transfer_id, S.BOOTSTRAPPING)
        if state.terminal:
            self.update(ticket.transfer_id, state, error)

    def seal(self) -> None:
        """Every part is added: from now on the set reports its end."""
        with self._lock:
            self._sealed = True
        if self._error is not None:  # parts added after the first failure: abort them too
            self.abort_rest(self._error)
        self.update("", S.BOOTSTRAPPING)

    def update(self, transfer_id: str, state: TransferState, error: str | None = None) -> None:
        with self._lock:
            old = self._states.get(transfer_id)
            if old is not None and not old.terminal:
                self._states[transfer_id] = state
            first_failure = state is S.FAILED and self._error is None and old is not None
            if first_failure:
                self._error = f"part {transfer_id[:8]} failed: {error}"
            done = self._sealed and not self._reported and self._all_terminal()
            self._reported |= done
        if first_failure:
            self.abort_rest(self._error)
        if done:
            report_done(self._on_done, self.ticket.transfer_id, self.poll())

    def _all_terminal(self) -> bool:
        return all(s.terminal for s in self._states.values())

    def poll(self) -> TransferState:
        states = list(self._states.values())
        if all(s.terminal for s in states):
            return S.FAILED if S.FAILED in states else S.SUCCESS
        live = [s for s in states if not s.terminal]
        order = [S.BOOTSTRAPPING, S.WAITING, S.TRANSFERRING]
        return min(live, key=order.index)

    @property
    def error(self) -> str | None:
        return self._error


class _Group:
    """What both sides share: the part set, local parts, remote parts' ranks."""

    def __init__(self, parts: PartSet, abort_remote: AbortRemote) -> None:
        self.parts = parts
        self._remote: dict[str, int] = {}
        self._abort_remote = abort_remote
        self._local: list = []
        parts.abort_rest = self.abort

    @property
    def ticket(self) -> TransferTicket:
        return self.parts.ticket

    @property
    def tickets(self) -> list[TransferTicket]:
        return self.parts.tickets

    def add_remote(self, ticket: TransferTicket, rank: int) -> None:
        self.parts.add(ticket)
        self._remote[ticket.transfer_id] = rank

    def poll(self) -> TransferState:
        return self.parts.poll()

    @property
    def error(self) -> str | None:
        return self.parts.error

    def abort(self, reason: str = "aborted") -> None:
        for transfer in self._local:
            transfer.abort(reason)
        if self._remote:  # each follower reports its part's end once it let go
            self._abort_remote(dict(self._remote), reason)

    def rank_lost(self, rank: int, why: str) -> None:
        """Follower ``rank`` is gone: its parts end (a dead process writes nothing)."""
        for tid, r in self._remote.items():
            if r == rank:
                self.parts.update(tid, S.FAILED, why)


class GroupReceiver(_Group):
    """A ``KVReceiver`` over a decode group's parts of one transfer."""

    def add_local(self, receiver: KVReceiver) -> None:
        self._local.append(receiver)
        self.parts.add(receiver.ticket, receiver.poll(), receiver.error)

    def layers_arrived(self) -> list[int]:
        return self._local[0].layers_arrived() if self._local else []

    @property
    def timings(self) -> TransferTimings | None:
        """The slowest of this rank's parts (the other ranks' are theirs to time); None
        until every local part has its timings."""
        times = [getattr(r, "timings", None) for r in self._local]
        if not times or None in times:
            return None
        return TransferTimings(max(t.seconds for t in times), max(t.tail_seconds for t in times))


class GroupSender(_Group):
    """A ``KVSender`` over a prefill group's parts; :meth:`send_layer` sends this rank's
    parts, each its heads (``heads``: the slice of this rank's cache) of the layer."""

    def __init__(self, parts: PartSet, abort_remote: AbortRemote) -> None:
        super().__init__(parts, abort_remote)
        self._heads: list[tuple[int, int]] = []

    def add_local(self, sender: KVSender, heads: tuple[int, int]) -> None:
        self._local.append(sender)
        self._heads.append(heads)
        self.parts.add(sender.ticket, sender.poll(), sender.error)

    def send_layer(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        src_block_ids: Sequence[int] | None = None,
    ) -> None:
        for sender, heads in zip(self._local, self._heads, strict=True):
            kh, vh = head_view(k, heads), head_view(v, heads)
            sender.send_layer(layer, kh, vh, src_block_ids=src_block_ids)

    def finish(self) -> None:
        for sender in self._local:
            sender.finish()
