"""What both worker roles answer about themselves: ``Info`` (registration), ``Health``
(the engine loop's real state) and ``Stats`` (the engine thread's latest snapshot)."""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections.abc import Sequence

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.kv_cache.spec_pb import spec_to_pb
from engine.worker.loop import LoopHealth
from engine.worker.snapshot import LoadSnapshot
from proto import worker_pb2 as pb

_EPOCHS: weakref.WeakKeyDictionary[LLMEngine, int] = weakref.WeakKeyDictionary()
"""Each worker start (its engine) is an incarnation: a restarted worker, even in the same
process, reports a new epoch."""


def epoch_of(engine: LLMEngine) -> int:
    return _EPOCHS.setdefault(engine, time.time_ns())


def worker_info(
    engine: LLMEngine, config: WorkerConfig, address: str, kv_transports: Sequence[str]
) -> pb.InfoResponse:
    """``kv_transports``: decode, the endpoints it serves; prefill, those it may send with."""
    return pb.InfoResponse(
        worker_id=config.name,
        role=config.role,
        address=address,
        layout=spec_to_pb(engine.layout_spec),
        num_blocks=engine.layout.num_blocks,
        block_size=engine.layout.block_size,
        max_model_len=engine.max_model_len,
        model=str(engine.config.model),
        epoch=epoch_of(engine),
        pid=os.getpid(),
        hostname=socket.gethostname(),
        kv_transports=list(kv_transports),
        vocab_size=engine.spec.vocab_size,
        ep_size=engine.ep_size,
        tp_size=engine.tp_size,
    )


def health_response(h: LoopHealth) -> pb.HealthResponse:
    return pb.HealthResponse(
        serving=h.serving,
        loop_alive=h.loop_alive,
        seconds_since_step=h.seconds_since_step,
        has_work=h.has_work,
        reason=h.reason,
    )


def stats_response(
    snap: LoadSnapshot,
    transfer: dict[str, int],
    events: tuple[list[int], list[int]] = ([], []),
) -> pb.StatsResponse:
    """A ``StatsResponse`` from a snapshot, the KV endpoints' counters and the block events
    handed to this caller (only their one consumer gets them)."""
    moe = {"expert_tokens": snap.expert_tokens, "ep_size": snap.ep_size} if snap.ep_size else {}
    return pb.StatsResponse(
        num_blocks=snap.num_blocks,
        num_free_blocks=snap.num_free_blocks,
        queues=snap.load.queues,
        queued_prefill_tokens=max(0, snap.load.queued_prefill_tokens),
        num_requests=snap.load.num_requests,
        transfer=transfer,
        stored_block_hashes=events[0],
        evicted_block_hashes=events[1],
        prefill_tokens_per_s=snap.prefill_tokens_per_s,
        **moe,
    )


def default_host() -> str:
    """This node's address for internal ports (never 0.0.0.0)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
