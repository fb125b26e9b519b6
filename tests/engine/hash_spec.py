"""The prefix-block hash spec of ``engine/kv_cache/hashing.py``, written again here from its
docstring (not from its code), plus vectors pinned from this re-implementation.

Block ``i`` hashes ``BLAKE2b-64(parent hash as u64 LE || token ids as i32 LE)``, read as a
little-endian integer; the first block's parent is 0. The engine's prefix cache and the
router's index must both agree with it, in every process.
"""

from __future__ import annotations

import hashlib


def spec_block(parent: int, token_ids: list[int]) -> int:
    data = parent.to_bytes(8, "little")
    data += b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def spec_chain(token_ids: list[int], block_size: int) -> list[int]:
    out, parent = [], 0
    for i in range(len(token_ids) // block_size):
        parent = spec_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


PINNED_1_TO_4 = 0x09222804E3E39BA2
"""``spec_block(0, [1, 2, 3, 4])``."""
PINNED_1_TO_9_BS4 = [658132497017838498, 7641984106258271874]
"""``spec_chain([1, ..., 9], 4)``: two full blocks, the partial one unhashed."""
PINNED_100_TO_149_BS16 = [18302864847687128017, 7719166282968391654, 10883749006440909790]
"""``spec_chain(list(range(100, 150)), 16)``."""
