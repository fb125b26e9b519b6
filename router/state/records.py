"""The JSON a worker record and its load take in Redis (keys: router/state/redis.py).

Anyone who can write to the Redis can put anything in these hashes, and one bad entry must
not fail every request on every router: :meth:`RecordReader.record` returns ``None`` for
an entry it cannot read, and logs it once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from engine.kv_cache.spec import KVLayoutSpec
from router.state.base import WorkerLoad, WorkerRecord

logger = logging.getLogger(__name__)

_PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


def record_fields(w: WorkerRecord) -> dict:
    """What a worker writes into ``<p>:workers``."""
    return {
        "worker_id": w.worker_id,
        "role": w.role,
        "address": w.address,
        "layout": asdict(w.layout),
        "num_blocks": w.num_blocks,
        "max_model_len": w.max_model_len,
        "epoch": w.epoch,
        "hostname": w.hostname,
        "ep_size": w.ep_size,
        "tp_size": w.tp_size,
        "kv_transports": list(w.kv_transports),
    }


class RecordReader:
    """Parses what routers read from Redis; logs each distinct bad entry once."""

    def __init__(self) -> None:
        self._logged: set[tuple[str, int]] = set()

    def _log_once(self, worker_id: str, text: str | None, what: str, exc: Exception) -> None:
        key = (worker_id, hash(text))
        if key in self._logged:
            return
        if len(self._logged) > 10_000:  # bounded, whatever the hash holds
            self._logged.clear()
        self._logged.add(key)
        logger.error(
            "skipping worker %r: malformed %s in Redis (%s: %s)",
            worker_id[:200], what, type(exc).__name__, str(exc)[:200],
        )  # fmt: skip

    def load(self, worker_id: str, text: str | None) -> WorkerLoad:
        """The worker's published load; an unreadable one counts as unknown (all zero)."""
        if not text:
            return WorkerLoad()
        try:
            load = WorkerLoad(**json.loads(text))
            if not isinstance(load.queues, dict):
                raise TypeError(f"queues is {type(load.queues).__name__}, not an object")
            return load
        except _PARSE_ERRORS as exc:
            self._log_once(worker_id, text, "load", exc)
            return WorkerLoad()

    def record(
        self, worker_id: str, text: str, load: str | None, inflight: str | None, alive: str | None
    ) -> WorkerRecord | None:
        """One ``<p>:workers`` entry with its load, in-flight count and heartbeat; ``None``
        (and a log, once) if it is not a worker record this version can read."""
        try:
            return self._record(worker_id, text, load, inflight, alive)
        except _PARSE_ERRORS as exc:
            self._log_once(worker_id, text, "record", exc)
            return None

    def _record(self, worker_id, text, load, inflight, alive) -> WorkerRecord:
        f = json.loads(text)
        if not isinstance(f, dict):
            raise TypeError(f"record is {type(f).__name__}, not an object")
        if f["role"] not in ("prefill", "decode"):
            raise ValueError(f"role {f['role']!r} is not prefill or decode")
        epoch = int(f["epoch"])
        return WorkerRecord(
            worker_id=worker_id,
            role=f["role"],
            address=str(f["address"]),
            layout=KVLayoutSpec(**f["layout"]),
            num_blocks=int(f["num_blocks"]),
            max_model_len=int(f["max_model_len"]),
            epoch=epoch,
            hostname=str(f["hostname"]),
            ep_size=int(f.get("ep_size", 1)),
            tp_size=int(f.get("tp_size", 1)),
            kv_transports=tuple(map(str, f["kv_transports"])),
            healthy=alive is not None and alive.isdigit() and int(alive) == epoch,
            load=self.load(worker_id, load),
            inflight=int(inflight or 0),
        )
