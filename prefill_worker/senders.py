"""Where the prefill worker's KV senders come from: one ``KVClient`` per enabled backend,
made on first use, and the transfer opened whole (one ticket) or in TP parts
(prefill_worker/tp.py). Called from gRPC threads, never the engine thread: pairing with
a ticket's endpoint is blocking network I/O."""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.security import ClusterSecret
from engine.worker.errors import WorkerError
from kv_transfer import KVClient, KVSender, OnDone, TransferTicket, make_client
from prefill_worker.tp import TPSenders


class Senders:
    """The KV clients of one prefill worker (its leader rank) and the TP parts' opener."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        self.engine, self.config = engine, config
        self._transfer = replace(
            config.transfer, host=config.host, secret=config.transfer.secret or secret
        )
        self._clients: dict[str, KVClient] = {}
        self._clients_lock = threading.Lock()  # gRPC threads open senders; not the engine's
        self.tp = TPSenders(engine, engine.parallel.channel)
        """Transfers in parts (prefill_worker/tp.py): a TP group here or on the decode side."""

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def open(
        self,
        rid: str,
        tickets: list[TransferTicket],
        prompt_len: int | None,
        num_cached_blocks: int,
        on_done: OnDone,
    ) -> KVSender:
        """Pair with the tickets' endpoints if needed and open the transfer (in parts, one
        per rank pair, when a side is a TP group); ``on_done`` is called once it ends."""
        client = self.client(tickets[0].backend)
        if len(tickets) == 1 and tickets[0].heads is None:
            return client.open(tickets[0], on_done=on_done)
        if prompt_len is None:  # AttachTicket: the followers could not tell the final chunk
            raise ValueError(
                "a transfer in TP parts comes with its Prefill (ticket and parts), not by "
                "AttachTicket; reserve on the decode worker first"
            )
        job = {"request_id": rid, "prompt_len": prompt_len, "num_cached_blocks": num_cached_blocks}  # fmt: skip
        job["backend"] = tickets[0].backend
        return self.tp.open(client, tickets, job, on_done)

    def client(self, backend: str) -> KVClient:
        if backend not in self.config.kv_transports:
            raise WorkerError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"kv transport {backend!r} is not enabled on {self.config.name}; "
                f"enabled: {list(self.config.kv_transports)}",
            )
        with self._clients_lock:
            if backend not in self._clients:
                spec = self.engine.rank_layout_spec
                self._clients[backend] = make_client(backend, spec, config=self._transfer)
            return self._clients[backend]
