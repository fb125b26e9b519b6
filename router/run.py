"""One request's life on the workers, from routing to its last token.

route      policy -> (decode D, prefill P | local, reason)     counted in metrics
remote:    router/remote.py: D.Reserve and P.Prefill at once, the ticket to P when D
           answers (reserve_mode "overlap"; "serial": one after the other) -> P's first
           token, yielded at once -> the ticket at P -> D.Decode stream (D admits the
           request when the KV is in; its first chunk says how the KV came: hop metrics)
           any failure before the first token -> abort on P and D, local fallback
           the KV lost after it (reservation or ticket refused, transfer failed)
                 -> D continues from the first token (Generate of prompt + first token)
           (reason: prefill_timeout, transfer_failed, layout_mismatch, ticket_refused,
           prefill_failed), except INTERNAL: the request itself failed -> 502, final
local:     D.Generate stream
D down     unreachable before any token (Reserve, or Generate's first chunk): marked
           unhealthy (for every router, with a shared state), routed once more
stream     tokens -> TextStream (stop strings) -> Output deltas
cleanup    unfinished (disconnect, timeout, stop string) -> Abort on P and D
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from engine.kv_cache.hashing import hash_blocks
from engine.worker.convert import params_to_pb
from proto import worker_pb2 as pb
from router.detok import TextStream
from router.job import Job, Output, RouterService
from router.policy import RouteDecision, RoutePath, RouteReason
from router.protocol import ApiError
from router.remote import RemotePrefill
from router.run_errors import (
    FALLBACKS,
    DecodeDown,
    Fallback,
    TransferLost,
    public_reason,
    worker_failed,
)
from router.run_holds import Holds
from router.state.base import WorkerRecord

logger = logging.getLogger(__name__)

_LOST = (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND)
"""What D's Decode answers when the KV never came (transfer failed, lease over)."""


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
        self.holds = Holds(svc)
        """What the request may hold on the workers (router/run_holds.py)."""
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.num_prompt_tokens = len(job.prompt)
        self.num_output = 0
        self._call = None
        self._remote_p: str | None = None
        """The prefill worker of the remote attempt (its pair's bandwidth estimate)."""
        self.prompt_logprobs: list[pb.Token] | None = None
        """From the prefill worker (or the first chunk of a local prefill)."""

    # -- token streams ------------------------------------------------------------------

    async def outputs(self) -> AsyncIterator[Output]:
        m, job = self.svc.metrics, self.job
        text = TextStream(self.svc.tokenizer, job.stop)
        last = None
        user_stops = set(job.params.stop_token_ids)
        async for chunk in self._chunks():
            if chunk.prompt_logprobs and self.prompt_logprobs is None:
                self.prompt_logprobs = list(chunk.prompt_logprobs)
            if job.discard_output and (chunk.tokens or chunk.finished):
                self.finish_reason = "length"
                yield self._out("", [], [], "length")
                return
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
        out = Output(
            text, list(ids), list(tokens), reason, self.num_prompt_tokens, self.num_output,
            self.cached_tokens, self.prompt_logprobs,
        )  # fmt: skip
        self.prompt_logprobs = None  # on the first output only
        return out

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
        self.holds.routed(d.worker_id)  # the slot svc.route reserved
        if decision.path is RoutePath.REMOTE:
            remote = RemotePrefill(self, decision)
            try:
                pre = await remote.first_token()
            except Fallback as fb:
                svc.metrics.route(RoutePath.LOCAL, fb.reason)
                logger.warning("request %s: remote prefill failed (%s)", self.job.request_id, fb)
            else:
                svc.metrics.route(RoutePath.REMOTE, decision.reason)
                self.cached_tokens, self._remote_p = pre.num_cached_tokens, remote.p.worker_id
                if pre.prompt_logprobs:
                    self.prompt_logprobs = list(pre.prompt_logprobs)
                yield pb.TokenChunk(tokens=[pre.first_token], num_prompt_tokens=pre.num_prompt_tokens)  # fmt: skip
                async for chunk in self._after_first(remote, pre.first_token):
                    yield chunk
                return
        else:
            svc.metrics.route(RoutePath.LOCAL, decision.reason)
        async for chunk in self._stream_local(d, decision.path is RoutePath.REMOTE):
            yield chunk

    async def _after_first(self, remote: RemotePrefill, first: pb.Token) -> AsyncIterator[pb.TokenChunk]:  # fmt: skip
        """D's Decode stream once P holds the ticket; without the KV, D continues locally."""
        d, rid = remote.d, self.job.request_id
        try:
            await remote.kv_bound()
            self._record_prefix(d)
            self._call = self.svc.registry.client(d).decode.Decode(
                pb.DecodeRequest(request_id=rid, first_token=first)
            )
            async for chunk in self._drain(self._call, d, rid, lost_ok=True):
                yield chunk
        except TransferLost as lost:
            logger.warning("request %s: %s; continuing on %s", rid, lost, d.worker_id)
            self.svc.metrics.route(RoutePath.LOCAL, lost.reason)  # after a remote first token
            async for chunk in self._continue_locally(d, first):
                yield chunk

    @property
    def to_abort(self) -> list[tuple[str, str, str]]:
        return self.holds.to_abort

    async def track(self, worker: WorkerRecord, rid: str) -> None:
        await self.holds.track(worker, rid)

    def done(self, worker: WorkerRecord, rid: str) -> None:
        self.holds.done(worker, rid)

    async def abort_all(self) -> None:
        await self.holds.abort_all()

    async def prefill_failed(self, decision: RouteDecision, exc: grpc.aio.AioRpcError) -> None:
        """Abort on both workers, then fall back to local prefill (or a 400 for bad input).
        INTERNAL is the request's own failure (e.g. non-finite logits): it would fail the
        same way on D, so it is final (a 502 naming the reason), not computed twice."""
        await self.abort_all()
        self.raise_bad_input(exc)
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

    def raise_bad_input(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ApiError(400, exc.details() or "invalid request") from None

    def _observe(self, report: pb.TransferReport, d: WorkerRecord) -> None:
        """D's account of how the KV came (the first chunk of its Decode stream)."""
        m = self.svc.metrics
        m.hops.labels(hop="transfer_tail").observe(report.tail_seconds)
        m.hops.labels(hop="decode_admission").observe(report.admission_seconds)
        m.kv_bytes.inc(report.bytes)
        m.kv_seconds.inc(max(0.0, report.seconds))
        if self._remote_p is not None:
            self.svc.policy.observe_transfer(self._remote_p, d.worker_id, report.bytes, report.seconds)  # fmt: skip

    async def _continue_locally(self, d: WorkerRecord, first: pb.Token) -> AsyncIterator[pb.TokenChunk]:  # fmt: skip
        """The rest of the request on D from the prompt and the first token (seeded
        sampling draws by position, so it continues as the remote path would have)."""
        params, tok = self.job.params, first.token_id
        eos = tok == self.svc.tokenizer.eos_token_id and not params.ignore_eos
        stop = tok in params.stop_token_ids or eos
        if params.max_tokens <= 1 or (stop and params.min_tokens <= 1):
            yield pb.TokenChunk(finished=True, finish_reason="stop" if stop else "length")
            return
        spec = pb.RequestSpec(
            request_id=f"{self.job.request_id}-cont",
            prompt_token_ids=[*self.job.prompt, tok],
            params=params_to_pb(
                replace(
                    params,
                    max_tokens=params.max_tokens - 1,
                    min_tokens=max(0, params.min_tokens - 1),
                )
            ),  # fmt: skip
        )
        await self.track(d, spec.request_id)
        self._call = self.svc.registry.client(d).decode.Generate(spec)
        async for chunk in self._drain(self._call, d, spec.request_id):
            yield chunk

    async def _stream_local(self, d: WorkerRecord, fallback: bool) -> AsyncIterator[pb.TokenChunk]:
        spec = pb.RequestSpec()
        spec.CopyFrom(self.spec)
        if fallback:  # the first attempt's id may still be held while its blocks drain
            spec.request_id = f"{self.job.request_id}-local"
        await self.track(d, spec.request_id)
        self._record_prefix(d)
        self._call = self.svc.registry.client(d).decode.Generate(spec)
        async for chunk in self._drain(self._call, d, spec.request_id):
            if chunk.num_cached_tokens:
                self.cached_tokens = chunk.num_cached_tokens
            yield chunk

    async def _drain(
        self, call, d: WorkerRecord, rid: str, lost_ok: bool = False
    ) -> AsyncIterator[pb.TokenChunk]:
        """``call``'s chunks; with ``lost_ok`` (a Decode stream) a stream that ends for want
        of its KV before any chunk raises TransferLost."""
        got = False
        try:
            async for chunk in call:
                if chunk.HasField("transfer"):
                    self._observe(chunk.transfer, d)
                if chunk.finished:
                    self.done(d, rid)
                got = True
                yield chunk
        except grpc.aio.AioRpcError as exc:
            self.raise_bad_input(exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                await self.svc.io(self.svc.state.mark_unhealthy, d.worker_id, d.epoch)
                raise DecodeDown(d.worker_id, exc.details()) from None
            if lost_ok and not got and exc.code() in _LOST:
                raise TransferLost(exc.details()) from None
            raise worker_failed(d, rid, exc) from None

    # -- cleanup --------------------------------------------------------------------------

    async def cleanup(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()
        await self.holds.release()
