"""One request's life on the workers, from routing to its last token.

route      policy -> (decode D, prefill P | local, reason)     counted in metrics
remote:    D.Reserve -> P.Prefill (first token) -> D.Decode stream
           any failure before the first token -> abort on P and D, local fallback
           (reason: prefill_timeout, transfer_failed, layout_mismatch, ticket_refused,
           prefill_failed), except INTERNAL: the request itself failed -> 502, final
local:     D.Generate stream
D down     unreachable before any token (Reserve, or Generate's first chunk): marked
           unhealthy (for every router, with a shared state), routed once more
stream     tokens -> TextStream (stop strings) -> Output deltas
cleanup    unfinished (disconnect, timeout, stop string) -> Abort on P and D
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from engine.kv_cache.hashing import hash_blocks
from engine.worker.convert import params_to_pb
from proto import worker_pb2 as pb
from router.detok import TextStream
from router.job import Job, Output, RouterService
from router.policy import RouteDecision, RoutePath, RouteReason
from router.protocol import ApiError
from router.run_errors import (
    FALLBACKS,
    SHIELD_ERRORS,
    DecodeDown,
    Fallback,
    public_reason,
    worker_failed,
)
from router.state.base import WorkerRecord

logger = logging.getLogger(__name__)


class RequestRun:
    """One request's attempts on the workers (see the module docstring)."""

    def __init__(self, svc: RouterService, job: Job) -> None:
        self.svc, self.job = svc, job
        self.cfg = svc.config
        self.spec = pb.RequestSpec(
            request_id=job.request_id,
            prompt_token_ids=job.prompt,
            params=params_to_pb(job.params),
        )
        self.to_abort: list[tuple[str, str, str]] = []
        """(worker id, role, request id) of every attempt not known to be finished."""
        self.inflight: list[str] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.num_prompt_tokens = len(job.prompt)
        self.num_output = 0
        self._call = None
        self._reserved: str | None = None

    # -- token streams ------------------------------------------------------------------

    async def outputs(self) -> AsyncIterator[Output]:
        m, job = self.svc.metrics, self.job
        text = TextStream(self.svc.tokenizer, job.stop)
        last = None
        user_stops = set(job.params.stop_token_ids)
        async for chunk in self._chunks():
            now = time.monotonic()
            ids = [t.token_id for t in chunk.tokens]
            for _ in ids:
                if last is None:
                    m.ttft.observe(now - job.arrival)
                else:
                    m.itl.observe(now - last)
                last = now
            self.num_output += len(ids)
            # A stop token id ends the output (it can only be the last token: before
            # min_tokens the engine suppresses it) and never appears in the text.
            delta = text.add([t for t in ids if t not in user_stops])
            if text.stopped:
                self.finish_reason = "stop"
                yield self._out(delta, ids, chunk.tokens, "stop")
                return
            if chunk.finished:
                self.finish_reason = chunk.finish_reason or "stop"
                delta += text.flush()
                yield self._out(delta, ids, chunk.tokens, self.finish_reason)
                return
            if ids:
                yield self._out(delta, ids, chunk.tokens, None)
        raise ApiError(502, "the decode worker ended the stream early", "server_error")

    def _out(self, text: str, ids, tokens, reason: str | None) -> Output:
        if reason is not None:
            self.svc.metrics.e2e.observe(time.monotonic() - self.job.arrival)
            self.svc.metrics.prompt_tokens.inc(self.num_prompt_tokens)
            self.svc.metrics.generation_tokens.inc(self.num_output)
        return Output(
            text, list(ids), list(tokens), reason, self.num_prompt_tokens, self.num_output,
            self.cached_tokens,
        )  # fmt: skip

    async def _chunks(self) -> AsyncIterator[pb.TokenChunk]:
        for attempt in (1, 2):
            sent = False
            try:
                async for chunk in self._attempt():
                    sent = True
                    yield chunk
                return
            except DecodeDown as down:
                if sent or attempt == 2:
                    rid = self.job.request_id
                    logger.warning("request %s: %s", rid, down)
                    raise ApiError(502, f"decode worker {down.worker_id} is unreachable (request id {rid}): {public_reason(down.details)}; retry later", "server_error") from None  # fmt: skip
                logger.warning("request %s: %s; routing again", self.job.request_id, down)

    async def _attempt(self) -> AsyncIterator[pb.TokenChunk]:
        svc = self.svc
        decision = await svc.route(self.job)
        d = decision.decode
        self.inflight.append(d.worker_id)  # the slot svc.route reserved
        self._reserved = d.worker_id
        if decision.path is RoutePath.REMOTE:
            try:
                first = await self._remote_prefill(decision)
            except Fallback as fb:
                svc.metrics.route(RoutePath.LOCAL, fb.reason)
                logger.warning("request %s: remote prefill failed (%s)", self.job.request_id, fb)
            else:
                svc.metrics.route(RoutePath.REMOTE, decision.reason)
                yield first
                async for chunk in self._stream_decode(d):
                    yield chunk
                return
        else:
            svc.metrics.route(RoutePath.LOCAL, decision.reason)
        async for chunk in self._stream_local(d, decision.path is RoutePath.REMOTE):
            yield chunk

    async def _track(self, worker: WorkerRecord, rid: str) -> None:
        self.to_abort.append((worker.worker_id, worker.role, rid))
        if worker.worker_id == self._reserved:
            self._reserved = None  # counted since routing
            return
        self.inflight.append(worker.worker_id)
        await self.svc.io(self.svc.state.add_inflight, worker.worker_id, 1)

    def _done(self, worker: WorkerRecord, rid: str) -> None:
        self.to_abort = [t for t in self.to_abort if (t[0], t[2]) != (worker.worker_id, rid)]

    async def _remote_prefill(self, decision: RouteDecision) -> pb.TokenChunk:
        svc, d, p = self.svc, decision.decode, decision.prefill
        rid = self.job.request_id
        reg = svc.registry
        transport = svc.transport(p, d)
        await self._track(d, rid)
        reserve = pb.ReserveRequest(
            request=self.spec, kv_transport=transport, lease_s=self.cfg.lease_s,
            prefill_tp_size=p.tp_size,  # a TP group on either side: D plans rank-to-rank parts
        )  # fmt: skip
        try:
            res = await reg.client(d).decode.Reserve(reserve, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            self._raise_bad_input(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                await svc.io(svc.state.mark_unhealthy, d.worker_id, d.epoch)
                raise DecodeDown(d.worker_id, exc.details()) from None
            raise Fallback(RouteReason.RESERVE_FAILED) from exc
        await self._track(p, rid)
        req = pb.PrefillRequest(
            request=self.spec, ticket=res.ticket, num_cached_blocks=res.num_cached_blocks,
            parts=res.parts,
        )  # fmt: skip
        try:
            pre = await reg.client(p).prefill.Prefill(req, timeout=self.cfg.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self._prefill_failed(decision, exc)
        self._done(p, rid)
        self._record_prefix(d)
        svc.metrics.kv_bytes.inc(pre.transfer_bytes)
        svc.metrics.kv_seconds.inc(max(0.0, pre.transfer_seconds))
        svc.policy.observe_transfer(p.worker_id, d.worker_id, pre.transfer_bytes, pre.transfer_seconds)  # fmt: skip
        self.cached_tokens = pre.num_cached_tokens
        self._call = reg.client(d).decode.Decode(
            pb.DecodeRequest(request_id=rid, first_token=pre.first_token)
        )
        return pb.TokenChunk(tokens=[pre.first_token], num_prompt_tokens=pre.num_prompt_tokens)

    async def _prefill_failed(self, decision: RouteDecision, exc: grpc.aio.AioRpcError) -> None:
        """Abort on both workers, then fall back to local prefill (or a 400 for bad input).
        INTERNAL is the request's own failure (e.g. non-finite logits): it would fail the
        same way on D, so it is final (a 502 naming the reason), not computed twice."""
        await self._abort_all()
        self._raise_bad_input(exc)
        p, code = decision.prefill, exc.code()
        if code == grpc.StatusCode.INTERNAL:
            self.svc.metrics.route(RoutePath.REMOTE, decision.reason)
            raise worker_failed(p, self.job.request_id, exc) from None
        if code == grpc.StatusCode.UNAVAILABLE:
            await self.svc.io(self.svc.state.mark_unhealthy, p.worker_id, p.epoch)
        raise Fallback(FALLBACKS.get(code, RouteReason.PREFILL_FAILED)) from exc

    def _record_prefix(self, d: WorkerRecord) -> None:
        """D will hold the prompt's blocks (in the background: not on the request's path)."""
        hashes = hash_blocks(self.job.prompt, d.layout.block_size)
        self.svc.background(self.svc.io(self.svc.state.record_prefix, d.worker_id, hashes))

    def _raise_bad_input(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(400, exc.details() or "invalid request") from None

    async def _stream_decode(self, d: WorkerRecord) -> AsyncIterator[pb.TokenChunk]:
        async for chunk in self._drain(self._call, d, self.job.request_id):
            yield chunk

    async def _stream_local(self, d: WorkerRecord, fallback: bool) -> AsyncIterator[pb.TokenChunk]:
        spec = pb.RequestSpec()
        spec.CopyFrom(self.spec)
        if fallback:  # the first attempt's id may still be held while its blocks drain
            spec.request_id = f"{self.job.request_id}-local"
        await self._track(d, spec.request_id)
        self._record_prefix(d)
        self._call = self.svc.registry.client(d).decode.Generate(spec)
        async for chunk in self._drain(self._call, d, spec.request_id):
            if chunk.num_cached_tokens:
                self.cached_tokens = chunk.num_cached_tokens
            yield chunk

    async def _drain(self, call, d: WorkerRecord, rid: str) -> AsyncIterator[pb.TokenChunk]:
        try:
            async for chunk in call:
                if chunk.finished:
                    self._done(d, rid)
                yield chunk
        except grpc.aio.AioRpcError as exc:
            self._raise_bad_input(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                await self.svc.io(self.svc.state.mark_unhealthy, d.worker_id, d.epoch)
                raise DecodeDown(d.worker_id, exc.details()) from None
            raise worker_failed(d, rid, exc) from None

    # -- cleanup --------------------------------------------------------------------------

    async def _abort_all(self) -> None:
        targets, self.to_abort = self.to_abort, []
        reg = self.svc.registry
        calls = []
        for worker_id, role, rid in targets:
            client = reg.clients.get(worker_id)
            if client is not None:
                calls.append(client.stub(role).Abort(pb.AbortRequest(request_id=rid), timeout=5.0))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, SHIELD_ERRORS):
                logger.warning("abort failed: %r", result)

    async def cleanup(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()
        done, self.inflight = self.inflight, []
        for worker_id in done:
            await self.svc.io(self.svc.state.add_inflight, worker_id, -1)
        if self.to_abort:
            # Shielded: the caller may be a cancelled task (client disconnect).
            self.svc.background(self._abort_all())
