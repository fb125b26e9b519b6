"""The decode worker: receives a prompt's KV from a prefill worker, then decodes it.

A disaggregated request passes through these queues::

    Reserve ──> reserved ──(sender opened)──> receiving ──(all layers, SUCCESS)──> ready
                   │                              │                                 │
                   └──── lease expiry, abort, transfer FAILED: blocks freed ────────┤
                                                                                    ▼
    Decode(first token) ─────────────────────────────────────────> admitted to running
    Generate (local prefill: aggregated mode, fallbacks) ──> waiting ──> running
                                                       running ──> finished (stream ends)

``reserved``/``receiving``/``ready`` are this module's tables; ``waiting``/``running`` are
the engine scheduler's. A request is admitted only once its transfer is SUCCESS *and*
the router sent the first token (``Decode``). Blocks of a failed transfer come back
through the kv_transfer ``free_blocks`` callback, which aborts the reservation under the
engine lock; the worker never frees a block a transport thread may still write.

A request that fails alone (``finish_reason == "error"`` from the engine, or an exception
while handling its transfer or its output) ends its stream with INTERNAL and frees its
blocks; the loop goes on. While the loop does not serve (dead or stalled), new requests
get UNAVAILABLE, so the router marks this worker down and routes them elsewhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc

from decode_worker.info import stats_response
from decode_worker.runtime import EngineLoop, Sink, WorkerConfig, WorkerError
from engine.engine import LLMEngine
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVEndpoint, KVReceiver, TransferConfig, TransferState, make_endpoint
from proto import worker_pb2 as pb
from proto.convert import chunk_from_output, ticket_to_pb, token_logprobs

logger = logging.getLogger(__name__)

ABORTED, INTERNAL = grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL


def _endpoint_host(backend: str, host: str) -> str:
    # Workaround: the ucx listener binds the lo device's 127.0.0.1 whatever the configured
    # host, yet advertises that host; on another loopback address (Ray's 127.0.0.2) the
    # sender's UCX connect fails ("Endpoint is not connected"). Reported to kv_transfer.
    if backend == "ucx" and host.startswith("127."):
        return "127.0.0.1"
    return host


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    state: str
    """reserved | receiving | ready | running."""
    receiver: KVReceiver | None = None
    sink: Sink | None = None
    first_token: pb.Token | None = None
    num_cached_tokens: int = 0
    since: float = field(default_factory=time.monotonic)
    prompt: list[int] = field(default_factory=list)
    """Kept only when the prompt is scored (``params.prompt_logprobs``)."""


class DecodeWorker:
    """Engine + KV endpoints + request tables; thread-safe (see runtime.EngineLoop)."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self.engine = engine
        self.config = config
        self._reqs: dict[str, _Request] = {}
        self._owner: dict[tuple[int, ...], str] = {}
        """Transfer blocks -> request id, to route the free_blocks callback."""
        self.endpoints: dict[str, KVEndpoint] = {
            name: make_endpoint(
                name,
                engine.layout,
                engine.kv_caches,
                engine.layout_spec,
                self._free,
                config=TransferConfig(
                    host=_endpoint_host(name, config.host),
                    plane=dict(config.extra),
                    secret=config.secret,
                ),
            )
            for name in config.kv_transports
        }
        self.publishes_events = False
        """Set when a Redis publisher consumes the block events (router/publisher.py)."""
        self.loop = EngineLoop(
            engine, self._on_outputs, self._housekeeping, config.name, config.stall_timeout_s
        )
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()
        for endpoint in self.endpoints.values():
            endpoint.close()

    # -- requests (any thread) ------------------------------------------------------------

    def reserve(
        self, rid: str, prompt: list[int], params: SamplingParams, transport: str, lease_s: float
    ) -> tuple[pb.TransferTicket, int, int]:
        """Reserve blocks and open a transfer; returns (ticket, cached blocks, cached tokens)."""
        self.loop.check_serving()
        endpoint = self.endpoints.get(transport)
        if endpoint is None:
            raise WorkerError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"kv transport {transport!r} is not served by {self.config.name}; "
                f"it serves {sorted(self.endpoints)}",
            )
        self.engine.prepare(params)  # compile a new grammar outside the lock
        with self.loop.lock:
            try:
                res = self.engine.reserve(rid, prompt, params)
            except ValueError as exc:
                raise WorkerError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if res is None:
                raise WorkerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"no free KV blocks for {len(prompt)} tokens on {self.config.name} "
                    f"({self.engine.num_free_blocks} free)",
                )
            try:
                receiver = endpoint.expect(res.blocks_to_fill, lease_s)
            except (ValueError, RuntimeError) as exc:
                self.engine.abort(rid)
                raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"cannot expect KV: {exc}") from None
            self._owner[tuple(receiver.ticket.block_ids)] = rid
            cached = res.num_cached_blocks * self.engine.layout.block_size
            self._reqs[rid] = _Request(rid, params, "reserved", receiver, num_cached_tokens=cached)
        return ticket_to_pb(receiver.ticket, transport), res.num_cached_blocks, cached

    def decode(self, rid: str, first_token: pb.Token, sink: Sink) -> None:
        """Hand over the first token; the engine thread admits once the KV is complete."""
        self.loop.check_serving()
        vocab = self.engine.spec.vocab_size
        if not 0 <= first_token.token_id < vocab:
            raise WorkerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"first token id {first_token.token_id} is outside the vocabulary [0, {vocab})",
            )
        with self.loop.lock:
            req = self._reqs.get(rid)
            if req is None or req.receiver is None or req.sink is not None:
                raise WorkerError(
                    grpc.StatusCode.NOT_FOUND,
                    f"no reservation for request {rid!r} on {self.config.name} "
                    "(lease expired, aborted, or already decoding)",
                )
            req.first_token, req.sink = first_token, sink
        self.loop.wake()

    def generate(self, rid: str, prompt: list[int], params: SamplingParams, sink: Sink) -> None:
        """Prefill locally and decode."""
        self.loop.check_serving()
        self.engine.prepare(params)  # compile a new grammar outside the lock
        with self.loop.lock:
            if rid in self._reqs:
                raise WorkerError(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} in use")
            try:
                self.engine.add_request(rid, prompt, params)
            except ValueError as exc:
                raise WorkerError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            scored = prompt if params.prompt_logprobs is not None else []
            self._reqs[rid] = _Request(rid, params, "running", sink=sink, prompt=scored)
        self.loop.wake()

    def abort(self, rid: str) -> bool:
        """Stop ``rid`` wherever it is and free its blocks; False if unknown."""
        with self.loop.lock:
            req = self._release(rid)
            if req is None:
                return self.engine.abort(rid)
            if req.sink is not None:
                req.sink.put(pb.TokenChunk(finished=True, finish_reason="abort"))
            return True

    def _release(self, rid: str) -> _Request | None:
        """Drop ``rid`` from the tables and free its blocks (those of a transfer still in
        flight come back through ``_free`` once the transport let go of them)."""
        req = self._reqs.pop(rid, None)
        if req is None:
            return None
        rx = req.receiver
        if rx is not None and not rx.poll().terminal:
            rx.abort("aborted by the router")
        elif rx is None or rx.poll() is TransferState.SUCCESS:
            if rx is not None:
                self._owner.pop(tuple(rx.ticket.block_ids), None)
            self.engine.abort(rid)
        return req

    def _fail_request(self, rid: str, why: str, code: grpc.StatusCode = INTERNAL) -> None:
        """``rid`` failed alone: its stream ends with ``code``, its blocks are freed."""
        req = self._release(rid)
        if req is None:
            self.engine.abort(rid)
        elif req.sink is not None:
            msg = f"request {rid} failed on {self.config.name}: {why}"
            req.sink.put(WorkerError(code, msg))

    def fail_all(self, why: str) -> None:
        """End every stream with ``why`` (the engine cannot go on, e.g. an EP rank died)."""
        for req in list(self._reqs.values()):
            if req.sink is not None:
                req.sink.put(WorkerError(grpc.StatusCode.UNAVAILABLE, why))
        self._reqs.clear()

    def stats(self, drain_events: bool | None = None) -> pb.StatsResponse:
        """Load and counters; block events are drained only by their consumer: the Redis
        publisher when there is one (``publishes_events``), else the ``Stats`` caller."""
        drain = not self.publishes_events if drain_events is None else drain_events
        with self.loop.hold():
            sched = self.engine.scheduler
            queues = dict.fromkeys(("reserved", "receiving", "ready"), 0)
            for req in self._reqs.values():
                if req.state in queues:
                    queues[req.state] += 1
            queues["waiting"], queues["running"] = len(sched.waiting), len(sched.running)
            queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
            queued += sum(
                r.num_prompt_tokens - r.num_computed_tokens
                for r in sched.running
                if r.num_computed_tokens < r.num_prompt_tokens
            )
            transfer: dict[str, int] = {}
            for name, ep in self.endpoints.items():
                for key, value in ep.stats().items():
                    transfer[f"{name}.{key}"] = value
            return stats_response(
                self.engine, queues, queued, len(self._reqs), drain, transfer=transfer
            )

    # -- engine thread -------------------------------------------------------------------

    def _free(self, block_ids: list[int]) -> None:
        """kv_transfer callback (transport threads): a transfer failed, free its request."""
        with self.loop.lock:
            rid = self._owner.pop(tuple(block_ids), None)
            if rid is not None:
                self.engine.abort(rid)
        self.loop.wake()

    def _housekeeping(self) -> bool:
        """Move transfers along; returns whether some are still in flight."""
        in_flight = False
        now = time.monotonic()
        for req in [r for r in self._reqs.values() if r.receiver is not None]:
            if req.state == "running":
                continue
            try:
                in_flight |= self._advance(req, now)
            except Exception as exc:
                logger.exception("request %s failed in its transfer", req.request_id)
                self._fail_request(req.request_id, f"internal error ({type(exc).__name__})")
        return in_flight

    def _advance(self, req: _Request, now: float) -> bool:
        """One reserved request's transfer; returns whether it is still in flight."""
        state = req.receiver.poll()
        if state is TransferState.FAILED:
            self._fail_request(req.request_id, f"KV transfer failed: {req.receiver.error}", ABORTED)
        elif state is TransferState.SUCCESS:
            if req.first_token is not None:
                self._admit(req)
            elif now - req.since > self.config.lease_s:
                why = "no Decode call within the lease after the KV arrived"
                self._fail_request(req.request_id, why, ABORTED)
            elif req.state != "ready":
                req.state, req.since = "ready", now
        else:
            if state is not TransferState.BOOTSTRAPPING:
                req.state = "receiving"
            return True
        return False

    def _admit(self, req: _Request) -> None:
        self._owner.pop(tuple(req.receiver.ticket.block_ids), None)
        tok = req.first_token
        out = self.engine.admit_prefilled(req.request_id, tok.token_id, token_logprobs(tok))
        req.state = "running"
        if out.finished:  # the first token already ended it; the router has that token
            self._reqs.pop(req.request_id, None)
            chunk = chunk_from_output(out, req.params.logprobs)
            del chunk.tokens[:]
            chunk.num_cached_tokens = req.num_cached_tokens
            req.sink.put(chunk)

    def _on_outputs(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            try:
                self._deliver(out)
            except Exception as exc:
                logger.exception("handling the output of request %s failed", out.request_id)
                self._fail_request(out.request_id, f"internal error ({type(exc).__name__})")

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
        if out.finished:
            self._reqs.pop(out.request_id, None)
        if req.sink is not None:
            req.sink.put(chunk)
