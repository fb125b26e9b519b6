"""The one error type worker code raises for a request: it carries its gRPC status."""

from __future__ import annotations

import grpc


class WorkerError(Exception):
    """A request-level failure with the gRPC status the servicer should return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
