"""Random paged-KV test data shared by the kernel tests."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Kernel vs torch reference (which computes in fp32 and rounds once): fp32 leaves only
# summation-order noise; fp16/bf16 allow a few output ulps (the kernel rounds P to the KV
# dtype for the P·V product on GPU; the interpreter truncates instead of rounding).
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def make_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V caches ``[num_blocks, block_size, Hkv, D]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    return k, v


def make_block_tables(
    seq_lens: list[int], block_size: int, num_blocks: int, seed: int
) -> torch.Tensor:
    """int32 ``[B, max_blocks]`` of distinct, shuffled (non-contiguous) block ids, 0-padded."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    if sum(need) > num_blocks:
        raise ValueError(f"{sum(need)} blocks needed, pool has {num_blocks}")
    ids = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros((len(seq_lens), max(max(need), 1)), dtype=torch.int32)
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return table.to(DEVICE)


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)
