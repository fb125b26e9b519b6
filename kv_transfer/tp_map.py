"""Which prefill rank sends which KV heads to which decode rank, between TP groups.

Rank ``r`` of a TP group of ``t`` holds KV heads ``kv_head_range(H, t, r)``: an equal split
when ``H >= t``, one replicated head when ``H < t``. A transfer between a prefill group of
``a`` ranks and a decode group of ``b`` is cut into *parts*: every head of every decode
rank comes from exactly one prefill rank that holds it (of several holders of a replicated
head, the one at ``decode rank % holders``), consecutive heads from the same rank making
one part. Each part moves rank to rank, never through rank 0::

    H=4  a=1 -> b=2:  P0 heads 0-1 -> D0      P0 heads 2-3 -> D1
    H=4  a=2 -> b=1:  P0 heads 0-1 -> D0      P1 heads 2-3 -> D0   (D0 writes each half)
    H=1  a=2 -> b=2:  P0 head 0 -> D0         P1 head 0 -> D1      (replicated head)

Any two valid TP sizes of one model map this way (in particular whenever one divides the
other). Pairing checks that each side's heads are what its TP size and rank imply, and
opening a part that a side does not hold fails that transfer naming both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.layout import kv_head_range
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer.base import TransferTicket


def valid_tp(num_kv_heads: int, tp_size: int) -> bool:
    big, small = max(num_kv_heads, tp_size), min(num_kv_heads, tp_size)
    return tp_size >= 1 and big % small == 0


@dataclass(frozen=True)
class Part:
    """Global KV heads ``[heads[0], heads[1])`` from prefill ``src_rank`` to decode
    ``dst_rank``."""

    src_rank: int
    dst_rank: int
    heads: tuple[int, int]


def _holder(num_kv_heads: int, prefill_tp: int, head: int, dst_rank: int) -> int:
    holders = [
        p for p in range(prefill_tp) if head in range(*kv_head_range(num_kv_heads, prefill_tp, p))
    ]
    return holders[dst_rank % len(holders)]


def plan_parts(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[Part]:
    """Every part of a transfer, decode rank by decode rank (see the module docstring)."""
    for side, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        if not valid_tp(num_kv_heads, tp):
            raise ValueError(
                f"{side} tp_size={tp} cannot hold {num_kv_heads} KV heads "
                "(one of them must divide the other)"
            )
    parts: list[Part] = []
    for d in range(decode_tp):
        start, end = kv_head_range(num_kv_heads, decode_tp, d)
        for h in range(start, end):
            src = _holder(num_kv_heads, prefill_tp, h, d)
            last = parts[-1] if parts else None
            if last and last.dst_rank == d and last.src_rank == src and last.heads[1] == h:
                parts[-1] = Part(src, d, (last.heads[0], h + 1))
            else:
                parts.append(Part(src, d, (h, h + 1)))
    return parts


def _where(name: str, spec: KVLayoutSpec) -> str:
    return (
        f"{name} tp_size={spec.tp_size} rank {spec.tp_rank} holds KV heads "
        f"[{spec.head_start}, {spec.head_end}) of {spec.num_kv_heads}"
    )


def check_pairable(
    ours: KVLayoutSpec, theirs: KVLayoutSpec, our_name: str, their_name: str
) -> None:
    """Raise ``ValueError`` naming both sides unless each holds what its TP size and rank
    imply (then every part between them can be mapped)."""
    sides = ((our_name, ours), (their_name, theirs))
    for name, spec in sides:
        ok = valid_tp(spec.num_kv_heads, spec.tp_size) and 0 <= spec.tp_rank < spec.tp_size
        want = kv_head_range(spec.num_kv_heads, spec.tp_size, spec.tp_rank) if ok else None
        if want != (spec.head_start, spec.head_end):
            both = "; ".join(_where(n, s) for n, s in sides)
            raise ValueError(
                f"TP layouts cannot be mapped: {name}'s KV heads are not what its "
                f"tp_size={spec.tp_size} and rank {spec.tp_rank} imply ({both}). Start both "
                "groups with the same model and a --tp-size that divides, or is a multiple "
                "of, its KV heads"
            )


def part_heads(ticket: TransferTicket, spec: KVLayoutSpec) -> tuple[int, int]:
    """A ticket's global heads (every head of ``spec``'s rank when it names none)."""
    return ticket.heads if ticket.heads is not None else (spec.head_start, spec.head_end)


def check_part(sender: KVLayoutSpec, receiver: KVLayoutSpec, ticket: TransferTicket) -> str | None:
    """Why this prefill rank cannot send ``ticket``'s part to that decode rank, if so."""
    heads = part_heads(ticket, receiver)
    for name, spec in (("prefill", sender), ("decode", receiver)):
        if not spec.head_start <= heads[0] < heads[1] <= spec.head_end:
            return (
                f"ticket {ticket.transfer_id} asks for KV heads {list(heads)} but "
                f"{_where('prefill', sender)} and {_where('decode', receiver)} "
                f"({name} does not hold them); the prefill worker's --tp-size differs from "
                "the one the decode worker planned for"
            )
    return None


def local_heads(spec: KVLayoutSpec, heads: tuple[int, int] | None) -> tuple[int, int] | None:
    """The slice of this rank's cache heads a part writes (``None``: every head)."""
    if heads is None or heads == (spec.head_start, spec.head_end):
        return None
    if not spec.head_start <= heads[0] < heads[1] <= spec.head_end:
        raise ValueError(
            f"KV heads {list(heads)} are not in this rank's [{spec.head_start}, {spec.head_end})"
        )
    return heads[0] - spec.head_start, heads[1] - spec.head_start
