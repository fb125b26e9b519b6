"""Expert parallelism: dispatch tokens to the ranks owning their top-k experts, combine back.

Each of the ``size`` ranks owns a contiguous slice of ``num_experts // size`` experts.
Attention is data-parallel: every rank runs only its own *home* sequences (embeddings,
attention on its own KV, dense MLPs, router gate, shared experts), so the ``N`` tokens
below are this rank's tokens only, and no step ever gathers all tokens to all ranks::

    rank 0: its seqs ─ attn ─ gate ─┐                 ┌─ combine ─ attn ─ ... ─ last rows ─┐
                                    ├─ all_to_all ─ experts ─ all_to_all ─┤                  ├─► rank 0
    rank 1: its seqs ─ attn ─ gate ─┘                 └─ combine ─ attn ─ ... ─ last rows ─┘   samples

A rank with no sequences in a step still joins every MoE layer's collectives with zero
rows. One MoE layer on one rank, for ``N`` tokens and top-``k`` routing::

    pairs (token, owner rank): one per token and rank owning any of its k experts, so a
      token whose experts share an owner travels there once (DeepEP-style)
      ──► grouped by owner rank:  | rank 0 rows | rank 1 rows | ... |   send_splits
    all_to_all_single(row counts)             equal splits: one int per rank (async,
                                              overlapped with gathering rows in send order)
    all_to_all_single(rows)                   uneven: send_splits ──► recv_splits; each row
                                              is [hidden | k weights | k expert ids (bits)]
    owner: weighted sum of its experts' outputs per row (ids of other ranks' experts ignored)
    all_to_all_single(weighted sums)          uneven: recv_splits ──► send_splits
    out.index_add_(token_of_row, sum)

The top-k ids and weights travel as ``2k`` extra columns of the row (the ids' integer bits
in the hidden dtype's width), so dedup costs no second exchange: with top-2 over 2 ranks
about 40% of tokens have both experts on one owner, and each such token moves once
instead of twice in both directions. The owner applies the weights, which are in the
hidden dtype as on one rank (``engine.layers.moe.route``). For top-2 the sums are added in
the single-rank order (expert order); for larger k the order of the floating-point adds
differs from one rank when a token's experts interleave across owners.
Only ``all_to_all_single`` is used because gloo supports uneven splits only there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallelGroup:
    """This rank's place in an EP group serving one model replica."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    """Group for expert traffic (NCCL on CUDA, gloo on CPU); ``None`` = default group."""
    control_group: dist.ProcessGroup | None = None
    """CPU (gloo) group for the leader's per-step broadcast; ``None`` = ``group``."""
    rank_pids: tuple[int, ...] = ()
    """Process id of every rank (same host), when the launcher knows them: a failed
    collective then names the rank that died (``engine/parallel/health.py``)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"EP rank {self.rank} out of range for ep_size={self.size}")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def cpu_group(self) -> dist.ProcessGroup | None:
        return self.control_group if self.control_group is not None else self.group

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """Global ids ``[start, end)`` of the experts this rank owns."""
        if num_experts % self.size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by ep_size={self.size}; "
                f"pick an --ep-size that divides {num_experts}"
            )
        per = num_experts // self.size
        return self.rank * per, (self.rank + 1) * per


@dataclass
class Dispatched:
    """Rows this rank received for its experts, and what ``combine`` needs to send back."""

    x: torch.Tensor
    """``[R, H]`` hidden rows (a strided view), one per (source token, this rank)."""
    expert_ids: torch.Tensor
    """``[R, k]`` the source token's global top-k expert ids (other ranks' included)."""
    weights: torch.Tensor
    """``[R, k]`` its routing weights (hidden dtype)."""
    tokens: torch.Tensor
    """``[S]`` token index of each sent row, in send order."""
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int
    group: dist.ProcessGroup | None = None


_WORKSPACE: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_ID_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Element size of the hidden dtype -> the integer type whose bits carry expert ids."""


def _buffer(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` view of a reused buffer: a fresh multi-MB tensor per layer costs page
    faults comparable to the transfer itself. ``name`` buffers are reused by the next
    MoE layer, so their contents die with the layer that filled them."""
    key = (name, like.device, like.dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
        buf = like.new_empty(max(rows, 1), cols)
        _WORKSPACE[key] = buf
    return buf[:rows]


def _pairs(
    expert_ids: torch.Tensor, per_local: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, per_rank)``: the token of each (token, owner) pair in owner-major order,
    and the number of pairs per owner rank."""
    hit = torch.zeros(size, expert_ids.shape[0], dtype=torch.bool, device=expert_ids.device)
    hit.scatter_(0, (expert_ids // per_local).T, True)
    per_rank = hit.sum(1)
    return torch.nonzero(hit)[:, 1], per_rank  # row-major: owner-major, then token


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    ep: ExpertParallelGroup,
) -> Dispatched:
    """Send each token's hidden row once to every rank owning one of its experts.

    ``Dispatched.x`` is a view of a reused buffer: valid until the next ``dispatch``."""
    n, hidden, k = x.shape[0], x.shape[1], expert_ids.shape[1]
    ep.expert_range(num_experts)  # names a bad ep_size
    tokens, per_rank = _pairs(expert_ids, num_experts // ep.size, ep.size)
    recv_counts = torch.empty_like(per_rank)
    # The count exchange is latency-bound: gather the rows in send order while it runs.
    counts_done = dist.all_to_all_single(recv_counts, per_rank, group=ep.group, async_op=True)
    width = hidden + 2 * k
    send = _buffer("send", tokens.numel(), width, x)
    torch.index_select(x, 0, tokens, out=send[:, :hidden])
    send[:, hidden : hidden + k] = weights[tokens]
    send[:, hidden + k :].view(_ID_BITS[x.element_size()]).copy_(expert_ids[tokens])
    send_splits = per_rank.tolist()
    counts_done.wait()
    recv_splits = recv_counts.tolist()
    recv = _buffer("recv", sum(recv_splits), width, x)
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=ep.group)
    ids = recv[:, hidden + k :].view(_ID_BITS[x.element_size()]).long()
    return Dispatched(
        recv[:, :hidden],
        ids,
        recv[:, hidden : hidden + k],
        tokens,
        send_splits,
        recv_splits,
        n,
        ep.group,
    )


def combine(y: torch.Tensor, d: Dispatched) -> torch.Tensor:
    """Return the owners' weighted sums ``y`` ``[R, H]`` to their senders; sum per token."""
    back = _buffer("back", sum(d.send_splits), y.shape[1], y)
    dist.all_to_all_single(back, y.contiguous(), d.send_splits, d.recv_splits, group=d.group)
    out = y.new_zeros(d.num_tokens, y.shape[1])
    out.index_add_(0, d.tokens, back)
    return out


def ep_expert_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    ep: ExpertParallelGroup,
    run_local,
) -> torch.Tensor:
    """``dispatch`` → ``run_local(rows, ids [R, k], weights [R, k]) -> [R, H]`` (the
    weighted sum of this rank's experts per row, other ranks' ids ignored: exactly
    ``engine.layers.moe.expert_forward``) → ``combine``."""
    d = dispatch(x, weights, expert_ids, num_experts, ep)
    return combine(run_local(d.x, d.expert_ids, d.weights), d)


def gather_to_leader(
    rows: torch.Tensor, counts: list[int], ep: ExpertParallelGroup
) -> torch.Tensor:
    """Rank 0 gets every rank's ``rows`` (``counts[r]`` rows from rank ``r``, rank-major);
    the other ranks get an empty tensor. One uneven ``all_to_all_single``: only rank 0
    receives, so nothing is gathered to every rank."""
    lead = ep.is_leader
    send_splits = [rows.shape[0]] + [0] * (ep.size - 1)
    recv_splits = list(counts) if lead else [0] * ep.size
    out = rows.new_empty(sum(recv_splits), rows.shape[1])
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=ep.group)
    return out


def ep_store(host: str, size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port of ``host`` (bound atomically: no race
    between picking a port and listening on it); followers use ``tcp://host:store.port``."""
    from datetime import timedelta

    return dist.TCPStore(
        host, 0, size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def join_ep_group(
    rank: int,
    size: int,
    init_method: str | None,
    device: str,
    timeout_s: float = 120.0,
    store: dist.Store | None = None,
) -> ExpertParallelGroup:
    """Join the EP group at ``init_method`` (``tcp://host:port`` of rank 0's store), or,
    on rank 0, through its own ``store`` (:func:`ep_store`).

    Expert traffic uses NCCL on CUDA and gloo on CPU; the per-step broadcast always uses
    a gloo group (it carries CPU bytes).
    """
    from datetime import timedelta

    cuda = str(device).startswith("cuda")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=None if store is not None else init_method,
        # init_method rendezvous prefixes its store with "default_pg"; match it.
        store=dist.PrefixStore("default_pg", store) if store is not None else None,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
    control = dist.new_group(backend="gloo") if cuda else None
    return ExpertParallelGroup(rank, size, None, control)
