"""Tickets that reach the prefill worker on their own (``AttachTicket``), on the engine
thread: one may come before its ``Prefill`` (the router sends both at once), and one may
come for a prefill that already ended.

    AttachTicket, no job yet  -> held until its Prefill takes it, or dropped at the lease
    AttachTicket, job ended   -> refused (NOT_FOUND), for a lease after the end
"""

from __future__ import annotations

from prefill_worker.commands import AttachTicket


class TicketDesk:
    def __init__(self, lease_s: float) -> None:
        self._lease_s = lease_s
        self._early: dict[str, tuple[AttachTicket, float]] = {}
        self._ended: dict[str, float] = {}

    def hold(self, cmd: AttachTicket, now: float) -> None:
        self._early[cmd.request_id] = (cmd, now + self._lease_s)

    def take(self, request_id: str) -> AttachTicket | None:
        held = self._early.pop(request_id, None)
        return held[0] if held is not None else None

    def ended(self, request_id: str, now: float) -> None:
        self._ended[request_id] = now

    def has_ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def expire(self, now: float) -> None:
        """Abort the senders of tickets whose Prefill never came; forget old ends."""
        for rid, (cmd, deadline) in list(self._early.items()):
            if now > deadline:
                del self._early[rid]
                cmd.sender.abort("its Prefill never came")
        for rid in [r for r, at in self._ended.items() if now > at + self._lease_s]:
            del self._ended[rid]

    def abort_all(self, why: str) -> None:
        for cmd, _ in self._early.values():
            cmd.sender.abort(why)
        self._early.clear()
