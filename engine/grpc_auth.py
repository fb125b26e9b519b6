"""Per-call authentication of the worker gRPC plane with the cluster secret.

Every call carries one metadata entry, ``x-pdserve-auth``::

    v1:<unix time, ms>:<nonce, 16 random bytes hex>:<HMAC-SHA256 hex>
    HMAC = ClusterSecret.sign("pdserve-grpc-v1", <full method name>, <time>, <nonce>)

The worker (``AuthServerInterceptor``) accepts a call when the MAC verifies for the method
being called, the time is within ``window_s`` of its own clock, and the nonce has not been
seen inside that window (a captured token cannot be replayed, nor moved to another method).
Anything else is answered ``UNAUTHENTICATED`` before the request is even parsed. The secret
never crosses the wire.

Why an HMAC token and not mTLS: the KV handshake and the transfer tickets already need a
shared cluster secret, so one secret (one Kubernetes Secret, one file on a Ray node)
authenticates all three planes; certificates would need issuing and rotating per pod, and
name checks break when Ray restarts a worker on another node and port. What it does not
give is confidentiality: run the cluster on a private network (see the README's Security
section), or put the pods on a mesh that encrypts pod-to-pod traffic.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc

from engine.security import ClusterSecret

logger = logging.getLogger(__name__)

METADATA_KEY = "x-pdserve-auth"
VERSION = "v1"
DOMAIN = "pdserve-grpc-v1"
"""Signed first: a gRPC token can never verify as a KV handshake or ticket MAC."""
_TOKEN = re.compile(rf"{VERSION}:([0-9]{{1,15}}):([0-9a-f]{{32}}):([0-9a-f]{{64}})")
DEFAULT_WINDOW_S = 60.0
"""Accepted clock difference between caller and worker (hosts are expected to run NTP)."""


def _mac(secret: ClusterSecret, method: str, ts_ms: str, nonce: str) -> str:
    return secret.sign(DOMAIN, method, ts_ms, nonce).hex()


def make_token(secret: ClusterSecret, method: str, now: float | None = None) -> str:
    """The ``x-pdserve-auth`` value for one call of ``method`` (e.g. ``/pdserve.X/Info``)."""
    ts_ms = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(16)
    return f"{VERSION}:{ts_ms}:{nonce}:{_mac(secret, method, ts_ms, nonce)}"


def call_metadata(secret: ClusterSecret | None, method: str) -> tuple[tuple[str, str], ...]:
    """Metadata to pass as ``metadata=`` on one call (sync clients); empty without a secret."""
    return () if secret is None else ((METADATA_KEY, make_token(secret, method)),)


class TokenVerifier:
    """Checks tokens for one worker; remembers nonces for ``window_s`` to refuse replays."""

    def __init__(self, secret: ClusterSecret, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.secret, self.window_s = secret, window_s
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def check(self, method: str, token: str | None, now: float | None = None) -> str | None:
        """``None`` if ``token`` authenticates a call of ``method``, else why not."""
        if not token:
            return (
                f"{method}: no {METADATA_KEY} metadata; this worker requires the cluster "
                "secret: start the caller with --cluster-secret-file (or "
                "$PDSERVE_CLUSTER_SECRET_FILE) naming the cluster's secret"
            )
        match = _TOKEN.fullmatch(token)
        if match is None:
            return f"{method}: malformed {METADATA_KEY} token (expected {VERSION}:<ms>:<nonce>:<mac>)"  # fmt: skip
        ts_ms, nonce, mac = match.groups()
        now = time.time() if now is None else now
        skew = abs(now - int(ts_ms) / 1000)
        if skew > self.window_s:
            return (
                f"{method}: token time is {skew:.0f}s from this worker's clock, over the "
                f"{self.window_s:.0f}s limit; synchronise the hosts' clocks (NTP)"
            )
        if not self.secret.verify(bytes.fromhex(mac), DOMAIN, method, ts_ms, nonce):
            return f"{method}: bad token signature; the caller's cluster secret differs from this worker's"  # fmt: skip
        return self._fresh(int(nonce[:16], 16), int(ts_ms) / 1000 + self.window_s, now)

    def _fresh(self, key: int, expires: float, now: float) -> str | None:
        """Remember a nonce until its token expires (64 bits of it: a few dozen bytes)."""
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)  # its token fails the time check anyway
            if key in self._seen:
                return "replayed token: its nonce was already used"
            self._seen[key] = expires
        return None


def _denying(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that aborts; the request bytes are never parsed."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - abort raises

    out = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=out)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=out)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=out)
    return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=out)


class AuthServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose ``x-pdserve-auth`` does not verify (``UNAUTHENTICATED``)."""

    def __init__(self, secret: ClusterSecret, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.verifier = TokenVerifier(secret, window_s)
        self._logged_at = 0.0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        token = next(
            (v for k, v in handler_call_details.invocation_metadata or () if k == METADATA_KEY),
            None,
        )
        why = self.verifier.check(method, token if isinstance(token, str) else None)
        if why is None:
            return handler
        self._log_refusal(why)
        return _denying(handler, why)

    def _log_refusal(self, why: str) -> None:
        self.verifier.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= 10.0:  # a flood of bad calls must not flood the log
            self._logged_at = now
            logger.warning("refused an unauthenticated gRPC call (%d so far): %s", self.verifier.refused, why)  # fmt: skip


def server_interceptors(secret: ClusterSecret | None) -> list[grpc.aio.ServerInterceptor]:
    return [] if secret is None else [AuthServerInterceptor(secret)]


class _Signer:
    """Adds a fresh ``x-pdserve-auth`` token to the calls of an ``aio`` channel."""

    def __init__(self, secret: ClusterSecret) -> None:
        self.secret = secret

    def _signed(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(METADATA_KEY, make_token(self.secret, method))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per call shape: a channel files each interceptor under one shape only.
class _UnaryUnary(_Signer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._signed(details), request)


class _UnaryStream(_Signer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._signed(details), request)


class _StreamUnary(_Signer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._signed(details), request_iterator)


class _StreamStream(_Signer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._signed(details), request_iterator)


def client_interceptors(secret: ClusterSecret | None) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that authenticate every call of an ``aio`` channel with ``secret``."""
    if secret is None:
        return []
    return [cls(secret) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def aio_channel(
    address: str, secret: ClusterSecret | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """An ``aio`` channel to a worker that authenticates every call when ``secret`` is set."""
    interceptors = client_interceptors(secret) or None
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
