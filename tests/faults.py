"""Test-only fault injection for real workers (production config has no fault knob): gRPC
server interceptors passed to ``start_worker(..., interceptors=...)``."""

from __future__ import annotations

import asyncio

import grpc


class DelayRpc(grpc.aio.ServerInterceptor):
    """Every call of ``method`` (e.g. ``"Prefill"``) waits ``delay_s`` before its handler
    runs, as a slow or overloaded worker would (the call is accepted, nothing happens);
    ``seen`` (a ``threading.Event``) is set as each call arrives."""

    def __init__(self, method: str, delay_s: float, seen=None) -> None:
        self.method, self.delay_s, self.seen = method, delay_s, seen

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.endswith(f"/{self.method}"):
            return handler
        inner = handler.unary_unary

        async def delayed(request, context):
            if self.seen is not None:
                self.seen.set()
            await asyncio.sleep(self.delay_s)
            return await inner(request, context)

        return handler._replace(unary_unary=delayed)


class FailRpc(grpc.aio.ServerInterceptor):
    """Every call of ``method`` fails with ``code`` -- once ``after`` (a
    ``threading.Event``) is set, when one is given: a fault that strikes at a chosen point
    of a request (the call waits for it, as a slow worker would, then fails)."""

    def __init__(self, method: str, code: grpc.StatusCode, after=None, wait_s: float = 60.0):
        self.method, self.code, self.after, self.wait_s = method, code, after, wait_s

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.endswith(f"/{self.method}"):
            return handler

        async def failing(request, context):
            if self.after is not None:
                await asyncio.to_thread(self.after.wait, self.wait_s)
            await context.abort(self.code, f"{self.method} failed: injected by the test")

        return handler._replace(unary_unary=failing)


class LateRpc(grpc.aio.ServerInterceptor):
    """Every call of ``method`` runs its handler only once ``until`` (a
    ``threading.Event``) is set, and to its end even if the caller gave up meanwhile: a
    call that reached the worker after later ones (the network reordered them), whose
    cancellation came too late to stop it."""

    def __init__(self, method: str, until, wait_s: float = 60.0) -> None:
        self.method, self.until, self.wait_s = method, until, wait_s

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.endswith(f"/{self.method}"):
            return handler
        inner = handler.unary_unary

        async def late(request, context):
            await asyncio.to_thread(self.until.wait, self.wait_s)
            return await asyncio.shield(inner(request, context))

        return handler._replace(unary_unary=late)
