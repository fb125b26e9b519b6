"""The decode worker: receives a prompt's KV from a prefill worker, then decodes it.

A disaggregated request passes through these queues::

    Reserve ──> reserved ──(sender opened)──> receiving ──(TransferDone SUCCESS)──> ready
                   │                              │                                 │
                   └── lease expiry, abort, TransferDone FAILED: blocks freed ──────┤
                                                                                    ▼
    Decode(first token) ─────────────────────────────────────────> admitted to running
    Generate (local prefill: aggregated mode, fallbacks) ──> waiting ──> running
                                                       running ──> finished (stream ends)

``reserved``/``receiving``/``ready`` are this module's table (``DecodeState``);
``waiting``/``running`` are the engine scheduler's. Everything here runs on the engine
thread (engine/worker/loop.py): gRPC handlers submit ``Reserve``/``Decode``/``Generate``/
``Abort``, and the KV endpoint's callback posts ``TransferDone`` when a transfer ends,
which wakes the loop. A request is admitted only once its transfer is SUCCESS *and* the
router sent the first token. An aborted reservation whose transfer is still in flight is
``releasing`` until its ``TransferDone``: the engine frees no block a transport thread may
still write.

A request that fails alone (``finish_reason == "error"`` from the engine, or an exception
while handling its transfer or its output) ends its stream with INTERNAL and frees its
blocks; the loop goes on. While the loop does not serve (dead or stalled), new requests
get UNAVAILABLE, so the router marks this worker down and routes them elsewhere.
"""

from __future__ import annotations

import logging
import time

import grpc

from decode_worker.commands import (
    Decode,
    DecodeRequest,
    DecodeState,
    Generate,
    Reserve,
    transfer_report,
)
from decode_worker.setup import make_endpoints
from decode_worker.tp import TPReceivers
from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.request import RequestOutput
from engine.security import ClusterSecret
from engine.worker.commands import Abort, TransferDone
from engine.worker.convert import chunk_from_output, token_logprobs
from engine.worker.errors import WorkerError
from engine.worker.loop import EngineLoop
from engine.worker.snapshot import RoleLoad
from kv_transfer import KVEndpoint, TransferState
from kv_transfer.wire import ticket_to_pb
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)

ABORTED, INTERNAL = grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL
S = DecodeState


class DecodeWorker:
    """Engine + KV endpoints + the request table, owned by one engine thread."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        self.engine, self.config = engine, config
        self._reqs: dict[str, DecodeRequest] = {}
        self.endpoints: dict[str, KVEndpoint] = make_endpoints(engine, config, secret)
        self.tp = TPReceivers(engine, self.endpoints, engine.parallel.channel)
        """Transfers in parts (decode/tp.py): a TP group here or on the prefill side."""
        self.loop = EngineLoop(engine, config.name, config.stall_timeout_s)
        self.loop.start(self)

    def close(self) -> None:
        self.loop.stop()
        for endpoint in self.endpoints.values():
            endpoint.close()
        if self.engine.kv_pool is not None:
            self.engine.kv_pool.close()

    def kv_transports(self) -> list[str]:
        return sorted(self.endpoints)

    def transfer_stats(self) -> dict[str, int]:
        return {f"{n}.{k}": v for n, ep in self.endpoints.items() for k, v in ep.stats().items()}

    def handlers(self) -> dict[type, object]:
        return {
            Reserve: self._reserve,
            Decode: self._decode,
            Generate: self._generate,
            Abort: self._abort,
            TransferDone: self._transfer_done,
        }

    # -- commands (engine thread) ---------------------------------------------------------

    def _reserve(self, cmd: Reserve) -> tuple[pb.TransferTicket, int, int, list]:
        endpoint = self.endpoints.get(cmd.transport)
        if endpoint is None:
            raise WorkerError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"kv transport {cmd.transport!r} is not served by {self.config.name}; "
                f"it serves {sorted(self.endpoints)}",
            )
        rid = cmd.request_id
        res = self.engine.reserve(rid, cmd.prompt, cmd.params)  # ValueError: bad input
        if res is None:
            raise WorkerError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no free KV blocks for {len(cmd.prompt)} tokens on {self.config.name} "
                f"({self.engine.num_free_blocks} free)",
            )

        def done(transfer_id: str, state: TransferState) -> None:  # a transport thread
            self.loop.post(TransferDone(rid, transfer_id, state is TransferState.SUCCESS))

        try:
            if cmd.prefill_tp == 1 and self.engine.tp_size == 1:
                receiver = endpoint.expect(res.blocks_to_fill, cmd.lease_s, on_done=done)
            else:  # rank-to-rank parts between TP groups
                receiver = self.tp.expect(cmd.transport, res.blocks_to_fill, cmd.lease_s, done, cmd.prefill_tp)  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            self.engine.abort(rid)
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"cannot expect KV: {exc}") from None
        cached = res.num_cached_blocks * self.engine.layout.block_size
        self._reqs[rid] = DecodeRequest(rid, cmd.params, S.RESERVED, receiver, num_cached_tokens=cached)  # fmt: skip
        parts = [ticket_to_pb(t, cmd.transport) for t in getattr(receiver, "tickets", ())]
        return ticket_to_pb(receiver.ticket, cmd.transport), res.num_cached_blocks, cached, parts

    def _decode(self, cmd: Decode) -> None:
        vocab = self.engine.spec.vocab_size
        if not 0 <= cmd.first_token.token_id < vocab:
            raise WorkerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"first token id {cmd.first_token.token_id} is outside the vocabulary [0, {vocab})",
            )
        req = self._reqs.get(cmd.request_id)
        if req is None or req.receiver is None or req.sink is not None or req.state is S.RELEASING:
            raise WorkerError(
                grpc.StatusCode.NOT_FOUND,
                f"no reservation for request {cmd.request_id!r} on {self.config.name} "
                "(lease expired, aborted, or already decoding)",
            )
        req.first_token, req.sink, req.decode_at = cmd.first_token, cmd.sink, cmd.received_at
        if req.state is S.READY:
            self._guarded(req.request_id, "its admission", self._admit, req)

    def _generate(self, cmd: Generate) -> None:
        rid = cmd.request_id
        if rid in self._reqs:
            raise WorkerError(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} in use")
        self.engine.add_request(rid, cmd.prompt, cmd.params)  # ValueError: bad input
        scored = cmd.prompt if cmd.params.prompt_logprobs is not None else []
        self._reqs[rid] = DecodeRequest(rid, cmd.params, S.RUNNING, sink=cmd.sink, prompt=scored)

    def _abort(self, cmd: Abort) -> bool:
        """Stop the request wherever it is and free its blocks; False if unknown."""
        req = self._reqs.get(cmd.request_id)
        if req is None:
            return self.engine.abort(cmd.request_id)
        sink = req.sink
        self._release(req)
        if sink is not None:
            sink.put(pb.TokenChunk(finished=True, finish_reason="abort"))
        return True

    def _transfer_done(self, ev: TransferDone) -> None:
        req = self._reqs.get(ev.request_id)
        if req is None or req.receiver is None or req.receiver.ticket.transfer_id != ev.transfer_id:
            return  # a request that already ended (its blocks were freed then)
        req.transfer_over = True
        if req.state is S.RELEASING:
            self._release(req)
        elif not ev.succeeded:
            why = f"KV transfer failed: {req.receiver.error}"
            self._fail_request(req.request_id, why, ABORTED)
        elif req.first_token is not None:
            req.kv_at = ev.at
            self._guarded(req.request_id, "its admission", self._admit, req)
        else:
            req.kv_at, req.state, req.since = ev.at, S.READY, time.monotonic()

    # -- the table (engine thread) --------------------------------------------------------

    def _release(self, req: DecodeRequest) -> None:
        """Drop ``req`` and free its blocks; a transfer the transport may still write into
        is aborted first, and its blocks are freed on its ``TransferDone``."""
        rx = req.receiver
        if rx is not None and not req.transfer_over and rx.poll() is not TransferState.SUCCESS:
            req.state, req.sink = S.RELEASING, None
            rx.abort("aborted by the router")
            return
        self._reqs.pop(req.request_id, None)
        self.engine.abort(req.request_id)

    def _fail_request(self, rid: str, why: str, code: grpc.StatusCode = INTERNAL) -> None:
        """``rid`` failed alone: its stream ends with ``code``, its blocks are freed."""
        req = self._reqs.get(rid)
        if req is None:
            self.engine.abort(rid)
            return
        sink = req.sink
        self._release(req)
        if sink is not None:
            sink.put(WorkerError(code, f"request {rid} failed on {self.config.name}: {why}"))

    def _guarded(self, rid: str, what: str, fn, *args) -> None:
        """``fn(*args)``; whatever it raises fails request ``rid`` only."""
        try:
            fn(*args)
        except Exception as exc:
            logger.exception("request %s failed in %s", rid, what)
            self._fail_request(rid, f"internal error ({type(exc).__name__})")

    def fail_all(self, why: str) -> None:
        """End every stream with ``why`` (the engine cannot go on, e.g. a rank of its group
        died) and free every block; the process then ends."""
        for req in list(self._reqs.values()):
            if req.sink is not None:
                req.sink.put(WorkerError(grpc.StatusCode.UNAVAILABLE, why))
            if req.receiver is not None:
                req.receiver.abort(why)
        self._reqs.clear()
        self.engine.abort_all()

    def load(self) -> RoleLoad:
        sched = self.engine.scheduler
        queues = dict.fromkeys((S.RESERVED.value, S.RECEIVING.value, S.READY.value), 0)
        for req in self._reqs.values():
            state = req.state
            if state is S.RESERVED and req.receiver.poll() is not TransferState.BOOTSTRAPPING:
                state = S.RECEIVING
            if state.value in queues:
                queues[state.value] += 1
        queues["waiting"], queues["running"] = len(sched.waiting), len(sched.running)
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(
            r.num_prompt_tokens - r.num_computed_tokens
            for r in sched.running
            if r.num_computed_tokens < r.num_prompt_tokens
        )
        return RoleLoad(queues, queued, len(self._reqs))

    # -- each iteration (engine thread) ---------------------------------------------------

    def housekeeping(self, now: float) -> None:
        """A request whose KV arrived but whose Decode call never came ends with its lease."""
        for req in [r for r in self._reqs.values() if r.state is S.READY]:
            if now - req.since > self.config.lease_s:
                why = "no Decode call within the lease after the KV arrived"
                self._fail_request(req.request_id, why, ABORTED)

    def _admit(self, req: DecodeRequest) -> None:
        tok = req.first_token
        out = self.engine.admit_prefilled(req.request_id, tok.token_id, token_logprobs(tok))
        req.state, req.report = S.RUNNING, transfer_report(req, self.engine.layout)
        if out.finished:  # the first token already ended it; the router has that token
            self._reqs.pop(req.request_id, None)
            chunk = chunk_from_output(out, req.params.logprobs)
            del chunk.tokens[:]
            chunk.num_cached_tokens = req.num_cached_tokens
            chunk.transfer.CopyFrom(req.report)
            req.sink.put(chunk)

    def on_outputs(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            self._guarded(out.request_id, "its output handling", self._deliver, out)

    def _deliver(self, out: RequestOutput) -> None:
        req = self._reqs.get(out.request_id)
        if req is None:
            return
        if out.error is not None:
            self._fail_request(out.request_id, out.error)
            return
        chunk = chunk_from_output(out, req.params.logprobs, req.prompt, req.params.prompt_logprobs)
        if req.receiver is not None:
            chunk.num_cached_tokens = req.num_cached_tokens
        if req.report is not None:  # the first chunk of a Decode stream
            chunk.transfer.CopyFrom(req.report)
            req.report = None
        if out.finished:
            self._reqs.pop(out.request_id, None)
        if req.sink is not None:
            req.sink.put(chunk)
