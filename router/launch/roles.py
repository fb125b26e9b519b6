"""Fills the worker role registry (engine/worker/roles.py): the one place that knows both
roles. Launch calls :func:`install` before it starts a worker."""

from __future__ import annotations

from decode_worker.service import DecodeService
from decode_worker.setup import prepare
from decode_worker.worker import DecodeWorker
from engine.worker.roles import WorkerRole, register_role
from prefill_worker.service import PrefillService
from prefill_worker.worker import PrefillWorker

ROLES = (
    WorkerRole("prefill", PrefillWorker, PrefillService, "PrefillService"),
    WorkerRole("decode", DecodeWorker, DecodeService, "DecodeService", prepare),
)


def install() -> None:
    for role in ROLES:
        register_role(role)
