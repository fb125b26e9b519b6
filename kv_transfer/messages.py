"""The data-path messages of one layer on the chunked backends (torch_dist, ucx): one per run
of blocks that are consecutive on both sides, sent straight from the source blocks and
received straight into the destination blocks; what is left of short runs is coalesced
into staged messages::

    ticket order:  0   1   2   3   4   5   6   7   8   9
    src ids:       7   8   9  10  11  30   2  18  19  20      (the sender's blocks)
    dst ids:      40  41  42  43  44   3  61  62  63  64      (the ticket's blocks)
    joint runs:   [0 ................ 4] [5] [6] [7 ...... 9]   (consecutive on both sides)
    messages:     [ 5 blocks: direct    ][2: staged][ 3: direct ]   with min_direct = 3 blocks

``message_blocks`` (in the descriptor) is the plan, the same for K and V. Each side then
moves a message's bytes straight from / into its cache when *its own* ids of that message
are consecutive, and through staging (gather / scatter) otherwise; a message is tagged
DIRECT when the receiver's side is consecutive (it posts that receive into the cache once
the descriptor is in), RING when it is not (it lands in a buffer posted ahead).

Scattered blocks stay staged: a message per 32 KiB block costs more than the copy it saves
(bench/RESULTS.md: 60 us per gloo message, 49 us per ucxx one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_DIRECT_BYTES = 256 << 10
"""A joint run shorter than this joins a staged message (gloo and ucxx reach ~95% of their
one-message bandwidth from messages of 256 KiB, ~60% at 32 KiB)."""


def run_min_bytes(config) -> int:
    """The sender's ``run_min_bytes`` plane option (TransferConfig.plane), else the default."""
    return int(config.plane.get("run_min_bytes", MIN_DIRECT_BYTES))


def consecutive(ids: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(ids, ids[1:], strict=False))


def plan(
    src: Sequence[int], dst: Sequence[int], block_bytes: int, max_bytes: int,
    min_direct: int = MIN_DIRECT_BYTES,
) -> list[int]:  # fmt: skip
    """Blocks per message for a layer moving ``src[i] -> dst[i]`` (see the module docstring)."""
    per_msg = max(1, max_bytes // block_bytes)
    short = max(1, -(-min_direct // block_bytes))
    out: list[int] = []
    staged = 0  # blocks of the staged message being built
    i, n = 0, len(dst)
    while i < n:
        j = i + 1
        while j < n and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        if j - i >= short:  # long enough to go straight
            if staged:
                out.append(staged)
                staged = 0
            out += [min(per_msg, j - k) for k in range(i, j, per_msg)]
        else:
            for _ in range(j - i):
                staged += 1
                if staged == per_msg:
                    out.append(staged)
                    staged = 0
        i = j
    if staged:
        out.append(staged)
    return out


def segments(message_blocks: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` block ranges of the plan's messages."""
    out, a = [], 0
    for m in message_blocks:
        out.append((a, a + m))
        a += m
    return out


def run_view(cache: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """The bytes of consecutive ``ids`` of a contiguous cache, as one uint8 view."""
    return cache[ids[0] : ids[-1] + 1].reshape(-1).view(torch.uint8)


def receiver_direct(desc, plan: Sequence[tuple[int, int, int]]) -> list[bool]:
    """Per message of ``plan`` (wire.desc_plan): does it go to the receiver's blocks
    straight (tag DIRECT: its destination ids are consecutive), or through the ring?"""
    if not desc.message_blocks:
        return [False] * len(plan)
    ids = desc.block_ids
    return [consecutive(ids[a:b]) for _, a, b in plan]
