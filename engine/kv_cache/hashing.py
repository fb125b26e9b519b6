"""Chained prefix-block hashes, shared by the engine's prefix cache and the router's index.

Block ``i`` of a sequence hashes ``(hash of block i-1, its block_size token ids, extra)``,
so equal hashes mean equal *prefixes*, not just equal blocks::

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes:   h0=H(root,b0) h1=H(h0,b1)   (partial block: no hash)

The hash is a stable 64-bit integer (BLAKE2b over little-endian bytes), identical across
processes, machines and Python versions, because the router computes it too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0
"""Parent hash of a sequence's first block."""


def hash_block(parent: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one full block given its parent block's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    if extra:
        h.update(extra)
    return int.from_bytes(h.digest(), "little")


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent: int = ROOT_HASH,
    extra: bytes = b"",
    start_block: int = 0,
) -> list[int]:
    """Hashes of every *full* block of ``token_ids`` from ``start_block`` on.

    ``parent`` must be the hash of block ``start_block - 1`` (``ROOT_HASH`` for block 0),
    which lets callers extend a sequence's hash list incrementally.
    """
    hashes = []
    for b in range(start_block, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size], extra)
        hashes.append(parent)
    return hashes
