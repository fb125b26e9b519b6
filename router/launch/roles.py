"""Fills the worker role registry (engine/worker/roles.py): the one place that knows both
roles. Launch calls :func:`install` before it starts a worker."""

from __future__ import annotations

from decode_worker.service import DecodeService
from decode_worker.setup import prepare
from decode_worker.tp import DecodeFollower
from decode_worker.worker import DecodeWorker
from engine.worker.roles import WorkerRole, register_role
from prefill_worker.service import PrefillService
from prefill_worker.tp import PrefillFollower
from prefill_worker.worker import PrefillWorker

ROLES = (
    WorkerRole("prefill", PrefillWorker, PrefillService, "PrefillService", PrefillFollower),
    WorkerRole("decode", DecodeWorker, DecodeService, "DecodeService", DecodeFollower, prepare),
)


def install() -> None:
    for role in ROLES:
        register_role(role)
