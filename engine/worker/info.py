"""What both worker kinds answer about themselves: ``Info`` (registration), ``Health``
(the engine loop's real state) and the common part of ``Stats``."""

from __future__ import annotations

import os
import socket
import time
import weakref

from engine.engine import LLMEngine
from engine.kv_cache.spec_pb import spec_to_pb
from engine.worker.loop import EngineLoop, WorkerConfig, expert_stats
from proto import worker_pb2 as pb

_EPOCHS: weakref.WeakKeyDictionary[LLMEngine, int] = weakref.WeakKeyDictionary()
"""Each worker start (its engine) is an incarnation: a restarted worker, even in the same
process, reports a new epoch."""


def epoch_of(engine: LLMEngine) -> int:
    return _EPOCHS.setdefault(engine, time.time_ns())


def worker_info(engine: LLMEngine, config: WorkerConfig, address: str) -> pb.InfoResponse:
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
        kv_transports=list(config.kv_transports) if config.role == "prefill" else [],
        vocab_size=engine.spec.vocab_size,
        ep_size=engine.ep.size if engine.ep is not None else 1,
    )


def health_response(loop: EngineLoop) -> pb.HealthResponse:
    h = loop.health()
    return pb.HealthResponse(
        serving=h.serving,
        loop_alive=h.loop_alive,
        seconds_since_step=h.seconds_since_step,
        has_work=h.has_work,
        reason=h.reason,
    )


def stats_response(
    engine: LLMEngine, queues: dict[str, int], queued: int, num_requests: int, drain: bool, **extra
) -> pb.StatsResponse:
    """A ``StatsResponse`` (call under the engine lock); ``drain``: hand over the block
    events (only their one consumer may)."""
    stored, evicted = engine.kv.pool.drain_events() if drain else ([], [])
    return pb.StatsResponse(
        num_blocks=engine.layout.num_blocks,
        num_free_blocks=engine.num_free_blocks,
        **expert_stats(engine),
        queues=queues,
        queued_prefill_tokens=max(0, queued),
        stored_block_hashes=stored,
        evicted_block_hashes=evicted,
        num_requests=num_requests,
        prefill_tokens_per_s=engine.prefill_rate.tokens_per_s,
        **extra,
    )
