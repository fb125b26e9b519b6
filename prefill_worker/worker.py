"""The prefill worker: computes prompts and streams their KV into decode workers' blocks.

A request passes through these queues::

    Prefill(ticket) ──> waiting ──(scheduled; chunked prefill)──> running
        ──(final chunk: after each layer, send_layer into the ticket's blocks)──>
        sending ──(TransferDone SUCCESS: D has every layer)──> done: release blocks, reply
                 ──(TransferDone FAILED)────────────────────> done: release, ABORTED

``waiting``/``running`` are the engine scheduler's queues; ``sending`` and ``done`` are
this module's (``JobState``). Everything here runs on the engine thread
(engine/worker/loop.py): the gRPC handler submits ``Prefill`` with a sender it opened,
and the sender's callback posts ``TransferDone`` when D confirmed or the transfer failed,
which wakes the loop. The engine's KV layer hook runs on the engine thread after each
layer; on a request's final prefill chunk every earlier chunk's KV is already in the
cache, so the hook queues that layer's pages for the whole prompt (kv_transfer gathers
and sends on its own thread) while the next layers compute. Blocks are released only
once the sender is SUCCESS or FAILED, so pages are never overwritten while being sent.
The last layer is held back until the first token is sampled: the decode side's transfer
completes only with it, so a request whose first token fails (non-finite logits) aborts a
transfer that D has not completed, and D frees the reservation at once instead of holding
a "successful" one until the router's Abort or the lease.

A prefill that fails alone (non-finite logits, an exception while sending its layers or
handling its output) aborts its KV stream, so the decode worker frees the reservation,
and replies INTERNAL; the loop goes on. While the loop does not serve (dead or
stalled) new prefills get UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import grpc
import torch

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.kv_handoff import LayerKV
from engine.request import RequestOutput
from engine.security import ClusterSecret
from engine.worker.commands import Abort, TransferDone
from engine.worker.convert import token_to_pb
from engine.worker.errors import WorkerError
from engine.worker.loop import EngineLoop
from engine.worker.snapshot import RoleLoad
from kv_transfer import KVClient, KVSender, TransferState, TransferTicket, make_client
from prefill_worker.commands import Job, JobState, Prefill
from prefill_worker.tp import TPSenders
from proto import worker_pb2 as pb

logger = logging.getLogger(__name__)


class PrefillWorker:
    """Engine + KV clients + the job table, owned by one engine thread."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        self.engine, self.config = engine, config
        self._transfer = replace(
            config.transfer, host=config.host, secret=config.transfer.secret or secret
        )
        self._clients: dict[str, KVClient] = {}
        self._clients_lock = threading.Lock()  # gRPC threads open senders; not the engine's
        self._jobs: dict[str, Job] = {}
        spec = engine.layout_spec  # the whole group's KV moves, every head
        self._block_bytes = spec.block_size * spec.bytes_per_token // 2 // spec.num_layers
        self.tp = TPSenders(engine, engine.parallel.channel)
        """Transfers in parts (prefill_worker/tp.py): a TP group here or on the decode side."""
        engine.kv_layer_hook = self._on_layer
        self.loop = EngineLoop(engine, config.name, config.stall_timeout_s)
        self.loop.start(self)

    def close(self) -> None:
        self.loop.stop()
        for client in self._clients.values():
            client.close()

    def kv_transports(self) -> list[str]:
        return list(self.config.kv_transports)

    def transfer_stats(self) -> dict[str, int]:
        return {}

    def handlers(self) -> dict[type, object]:
        return {Prefill: self._prefill, Abort: self._abort, TransferDone: self._transfer_done}

    # -- gRPC threads ----------------------------------------------------------------------

    def open_sender(
        self, rid: str, tickets: list[TransferTicket], prompt_len: int, num_cached_blocks: int
    ) -> KVSender:
        """Pair with the tickets' endpoints if needed (blocking network I/O: never on the
        engine thread) and open the transfer (in parts, one per rank pair, when a side is
        a TP group); its end is posted to the engine thread."""

        def done(transfer_id: str, state: TransferState) -> None:  # a transport thread
            self.loop.post(TransferDone(rid, transfer_id, state is TransferState.SUCCESS))

        client = self.client(tickets[0].backend)
        if len(tickets) == 1 and tickets[0].heads is None:
            return client.open(tickets[0], on_done=done)
        job = {"request_id": rid, "prompt_len": prompt_len, "num_cached_blocks": num_cached_blocks}  # fmt: skip
        job["backend"] = tickets[0].backend
        return self.tp.open(client, tickets, job, done)

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

    # -- commands (engine thread) ---------------------------------------------------------

    def _prefill(self, cmd: Prefill) -> None:
        try:
            self._admit(cmd)
        except Exception as exc:
            cmd.sender.abort(f"prefill refused: {exc}")
            raise

    def _admit(self, cmd: Prefill) -> None:
        bs = self.engine.layout.block_size
        need = -(-len(cmd.prompt) // bs) - cmd.num_cached_blocks
        have = len(cmd.sender.ticket.block_ids)
        if need != have:
            raise WorkerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ticket has {have} blocks but a {len(cmd.prompt)}-token prompt with "
                f"{cmd.num_cached_blocks} cached blocks needs {need} (block_size={bs})",
            )
        rid = cmd.request_id
        self.engine.add_request(rid, cmd.prompt, cmd.params, prefill_only=True)
        job = Job(rid, cmd.params, len(cmd.prompt), cmd.sender, cmd.num_cached_blocks, cmd.reply)
        self._jobs[rid] = job
        if cmd.sender.poll() is TransferState.FAILED:  # its TransferDone came before the job
            self._finish(job, WorkerError(grpc.StatusCode.ABORTED, self._why(job)))

    def _abort(self, cmd: Abort) -> bool:
        rid = cmd.request_id
        job = self._jobs.pop(rid, None)
        if job is not None:
            job.sender.abort("aborted by the router")
            job.reply(WorkerError(grpc.StatusCode.ABORTED, f"request {rid} was aborted"))
        return self.engine.abort(rid) or job is not None

    def _transfer_done(self, ev: TransferDone) -> None:
        job = self._jobs.get(ev.request_id)
        if job is None or job.sender.ticket.transfer_id != ev.transfer_id:
            return
        if not ev.succeeded:
            self._finish(job, WorkerError(grpc.StatusCode.ABORTED, self._why(job)))
        elif job.first is not None:
            self._finish(job, self._response(job))
        # else: SUCCESS before this step's outputs came back; on_outputs finishes it

    def fail_all(self, why: str) -> None:
        """Fail every prefill with ``why`` (the engine cannot go on, e.g. an EP rank died):
        each KV stream is aborted, so its decode worker frees the reserved blocks."""
        for job in list(self._jobs.values()):
            job.sender.abort(why)
            job.reply(WorkerError(grpc.StatusCode.UNAVAILABLE, why))
        self._jobs.clear()
        self.engine.abort_all()

    def load(self) -> RoleLoad:
        sched = self.engine.scheduler
        sending = sum(1 for j in self._jobs.values() if j.state is JobState.SENDING)
        queued = sum(r.num_prompt_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(r.num_prompt_tokens - r.num_computed_tokens for r in sched.running)
        queues = {"waiting": len(sched.waiting), "running": len(sched.running)}
        queues[JobState.SENDING.value] = sending
        return RoleLoad(queues, queued, len(self._jobs))

    # -- each step (engine thread) --------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        """Nothing runs on a timer here: transfers end by ``TransferDone``."""

    def _on_layer(
        self, layer: int, items: list[LayerKV], cache: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        # Runs inside the batch's model forward: whatever one item raises must stay with
        # that item's transfer, or it would end the whole step.
        for item in items:
            job = self._jobs.get(item.request_id)
            if job is None:
                continue
            job.state = JobState.RUNNING
            if item.end_pos < job.prompt_len:
                continue  # not the final chunk: this layer is sent once the prompt is whole
            if layer == self.engine.layout.num_layers - 1:
                job.held = (layer, item, cache)  # sent by _on_outputs (module docstring)
                continue
            self._try_send(job, layer, item, cache)

    def _try_send(self, job: Job, layer: int, item: LayerKV, cache) -> None:
        try:
            self._send_layer(job, layer, item, cache)
        except Exception as exc:
            logger.exception("sending layer %d of %s failed", layer, job.request_id)
            job.sender.abort(f"prefill could not send layer {layer} ({type(exc).__name__})")

    def _send_layer(self, job: Job, layer: int, item: LayerKV, cache) -> None:
        #  prefill block table:  [ cached on D | blocks to fill ... ]
        #                          0 .. nc-1     nc .. nc+len(ticket)-1  -> ticket.block_ids
        nc, n = job.num_cached_blocks, len(job.sender.ticket.block_ids)
        src = item.block_ids[nc : nc + n]
        if layer == 0:
            job.t_first_layer = time.monotonic()
        try:
            job.sender.send_layer(layer, cache[0], cache[1], src_block_ids=src)
        except ValueError as exc:
            job.sender.abort(f"prefill could not send layer {layer}: {exc}")
            return
        job.sent_layers += 1
        if job.sent_layers == self.engine.layout.num_layers:
            job.sender.finish()

    def on_outputs(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            job = self._jobs.get(out.request_id)
            if job is None or not out.finished:
                continue
            try:
                self._prefilled(job, out)
            except Exception as exc:  # fails this prefill only
                logger.exception("prefill %s failed handling its output", job.request_id)
                self._fail_job(job, f"internal error ({type(exc).__name__})")

    def _prefilled(self, job: Job, out: RequestOutput) -> None:
        if out.error is not None:
            self._fail_job(job, out.error)
            return
        job.first, job.state = out, JobState.SENDING
        held, job.held = job.held, None
        if held is not None:
            self._try_send(job, *held)
        elif job.sent_layers < self.engine.layout.num_layers:
            job.sender.abort("prefill finished without sending its last layer")
        if job.sender.poll() is TransferState.SUCCESS:  # D confirmed within the step
            self._finish(job, self._response(job))

    def _fail_job(self, job: Job, why: str) -> None:
        """``job`` failed alone: abort its KV stream (D frees the reservation), reply
        INTERNAL, free its blocks."""
        msg = f"request {job.request_id} failed on {self.config.name}: {why}"
        job.sender.abort(msg)
        job.first = None  # its blocks are not sent on: _finish frees rather than releases
        self._finish(job, WorkerError(grpc.StatusCode.INTERNAL, msg))

    def _why(self, job: Job) -> str:
        return f"KV transfer to {job.sender.ticket.endpoint} failed: {job.sender.error}"

    def _finish(self, job: Job, result: pb.PrefillResponse | WorkerError) -> None:
        self._jobs.pop(job.request_id, None)
        if job.first is not None:
            self.engine.release(job.request_id)
        else:
            self.engine.abort(job.request_id)
        job.reply(result)

    def _response(self, job: Job) -> pb.PrefillResponse:
        out = job.first
        lps = out.new_logprobs[0] if out.new_logprobs else None
        n = len(job.sender.ticket.block_ids)
        return pb.PrefillResponse(
            first_token=token_to_pb(out.new_token_ids[0], lps, job.params.logprobs),
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            transfer_bytes=2 * n * self._block_bytes * self.engine.layout.num_layers,
            transfer_seconds=time.monotonic() - job.t_first_layer,
        )
