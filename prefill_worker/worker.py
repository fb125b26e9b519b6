"""The prefill worker: computes prompts and streams their KV into decode workers' blocks.

A request passes through these queues::

    Prefill(ticket, or "ticket follows") ──> waiting ──(scheduled; chunked prefill)──> running
        ──(final chunk: after each layer, its KV into the ticket's blocks -- or, without a
          ticket yet, once AttachTicket brings one: streaming.py)──>
        first token sampled ──> reply to the router at once (its TTFT) ──> sending
        ──(TransferDone: D has every layer, or the transfer failed)──> done: blocks released
    no ticket within the lease ──> dropped (its router went away)

``waiting``/``running`` are the engine scheduler's queues; ``sending`` and ``done`` are
this module's (``JobState``). Everything here runs on the engine thread
(engine/worker/loop.py): the gRPC handlers submit ``Prefill`` (with a sender they opened,
or none) and ``AttachTicket`` (a sender they opened; it may come first: tickets.py), and the sender's callback posts ``TransferDone`` when D confirmed or the
transfer failed, which wakes the loop. Blocks are released only once the sender is
SUCCESS or FAILED, so pages are never overwritten while being sent. The reply does not
wait for the transfer: a transfer that fails after it is the decode worker's to report
(its Decode stream fails and the router continues the request there).
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
import time

import grpc
import torch

from engine.config import WorkerConfig
from engine.engine import LLMEngine
from engine.kv_handoff import LayerKV
from engine.request import RequestOutput
from engine.security import ClusterSecret
from engine.worker.commands import Abort, TransferDone
from engine.worker.errors import WorkerError
from engine.worker.loop import EngineLoop
from engine.worker.snapshot import RoleLoad
from kv_transfer import KVClient, KVSender, TransferState, TransferTicket
from prefill_worker import streaming
from prefill_worker.commands import AttachTicket, Job, JobState, Prefill, prefill_response
from prefill_worker.senders import Senders
from prefill_worker.tickets import TicketDesk

logger = logging.getLogger(__name__)
ABORTED = grpc.StatusCode.ABORTED


class PrefillWorker:
    """Engine + KV clients + the job table, owned by one engine thread."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, secret: ClusterSecret | None):
        self.engine, self.config = engine, config
        self.senders = Senders(engine, config, secret)
        self._jobs: dict[str, Job] = {}
        self._tickets = TicketDesk(config.lease_s)
        spec = engine.layout_spec  # the whole group's KV moves, every head
        self._block_bytes = spec.block_size * spec.bytes_per_token // 2 // spec.num_layers
        self._layers = engine.layout.num_layers
        engine.kv_layer_hook = self._on_layer
        self.loop = EngineLoop(engine, config.name, config.stall_timeout_s)
        self.loop.start(self)

    def close(self) -> None:
        self.loop.stop()
        self.senders.close()

    def kv_transports(self) -> list[str]:
        return list(self.config.kv_transports)

    def transfer_stats(self) -> dict[str, int]:
        return {}

    def handlers(self) -> dict[type, object]:
        return {
            Prefill: self._prefill,
            AttachTicket: self._attach,
            Abort: self._abort,
            TransferDone: self._transfer_done,
        }

    # -- gRPC threads ----------------------------------------------------------------------

    def open_sender(
        self,
        rid: str,
        tickets: list[TransferTicket],
        prompt_len: int | None,
        num_cached_blocks: int,
    ) -> KVSender:
        """Open the request's KV transfer (prefill_worker/senders.py: blocking network I/O,
        never on the engine thread); its end is posted to the engine thread."""

        def done(transfer_id: str, state: TransferState) -> None:  # a transport thread
            self.loop.post(TransferDone(rid, transfer_id, state is TransferState.SUCCESS))

        return self.senders.open(rid, tickets, prompt_len, num_cached_blocks, done)

    def client(self, backend: str) -> KVClient:
        return self.senders.client(backend)

    # -- commands (engine thread) ---------------------------------------------------------

    def _prefill(self, cmd: Prefill) -> None:
        try:
            self._admit(cmd)
        except Exception as exc:
            if cmd.sender is not None:
                cmd.sender.abort(f"prefill refused: {exc}")
            raise

    def _admit(self, cmd: Prefill) -> None:
        bs, rid = self.engine.layout.block_size, cmd.request_id
        if cmd.sender is not None:
            streaming.check_fits(len(cmd.prompt), bs, cmd.sender, cmd.num_cached_blocks)
        self.engine.add_request(rid, cmd.prompt, cmd.params, prefill_only=True)
        deadline = cmd.received_at + self.config.lease_s
        job = Job(rid, cmd.params, len(cmd.prompt), cmd.reply, deadline, cmd.received_at)
        job.sender, job.num_cached_blocks = cmd.sender, cmd.num_cached_blocks
        job.prompt = cmd.prompt if cmd.params.prompt_logprobs is not None else []
        self._jobs[rid] = job
        early = self._tickets.take(rid)
        if early is not None:
            self._guarded_attach(job, early)
        elif cmd.sender is not None and cmd.sender.poll() is TransferState.FAILED:
            self._finish(job, WorkerError(ABORTED, self._why(job)))  # its TransferDone came first

    def _attach(self, cmd: AttachTicket) -> None:
        job = self._jobs.get(cmd.request_id)
        if job is None and self._tickets.has_ended(cmd.request_id):
            cmd.sender.abort("its prefill already ended")
            raise WorkerError(grpc.StatusCode.NOT_FOUND, f"prefill {cmd.request_id!r} already ended")  # fmt: skip
        if job is None:  # its Prefill is still on the way
            self._tickets.hold(cmd, time.monotonic())
            return
        if job.sender is not None:
            cmd.sender.abort("a second ticket for the same prefill")
            raise WorkerError(grpc.StatusCode.ALREADY_EXISTS, f"request {cmd.request_id!r} already has a ticket")  # fmt: skip
        self._guarded_attach(job, cmd)

    def _guarded_attach(self, job: Job, cmd: AttachTicket) -> None:
        """Attach, or fail the job (a ticket that does not fit its prompt)."""
        try:
            streaming.check_fits(job.prompt_len, self.engine.layout.block_size, cmd.sender, cmd.num_cached_blocks)  # fmt: skip
        except WorkerError as exc:
            cmd.sender.abort(str(exc))
            self._finish(job, exc)
            raise
        streaming.attach(job, cmd.sender, cmd.num_cached_blocks, self.engine.kv_caches, self._layers)  # fmt: skip
        if cmd.sender.poll() is TransferState.FAILED:
            self._transfer_done(TransferDone(job.request_id, cmd.sender.ticket.transfer_id, False))

    def _abort(self, cmd: Abort) -> bool:
        rid = cmd.request_id
        early = self._tickets.take(rid)
        if early is not None:
            early.sender.abort("aborted by the router")
        job = self._jobs.get(rid)
        if job is not None:
            if job.sender is not None:
                job.sender.abort("aborted by the router")
            job.first = None  # nothing more is sent: free rather than release
            self._finish(job, WorkerError(ABORTED, f"request {rid} was aborted"))
        return self.engine.abort(rid) or job is not None or early is not None

    def _transfer_done(self, ev: TransferDone) -> None:
        job = self._jobs.get(ev.request_id)
        if job is None or job.sender is None or job.sender.ticket.transfer_id != ev.transfer_id:
            return
        if not ev.succeeded:
            self._finish(job, WorkerError(ABORTED, self._why(job)))
        elif job.first is not None:
            self._finish(job, None)
        # else: SUCCESS before this step's outputs came back; on_outputs finishes it

    def fail_all(self, why: str) -> None:
        """Fail every prefill with ``why`` (the engine cannot go on, e.g. an EP rank died):
        each KV stream is aborted, so its decode worker frees the reserved blocks."""
        self._tickets.abort_all(why)
        for job in list(self._jobs.values()):
            if job.sender is not None:
                job.sender.abort(why)
            if not job.replied:
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
        """Drop what no ticket came for within the lease (transfers end by ``TransferDone``)."""
        self._tickets.expire(now)
        for job in [j for j in self._jobs.values() if j.sender is None and now > j.deadline]:
            job.first = None
            why = f"request {job.request_id}: no ticket within the lease ({self.config.lease_s:g}s)"  # fmt: skip
            self._finish(job, WorkerError(ABORTED, why))

    def _on_layer(
        self, layer: int, items: list[LayerKV], cache: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        # Runs inside the batch's model forward: whatever one item raises must stay with
        # that item's transfer, or it would end the whole step.
        for item in items:
            job = self._jobs.get(item.request_id)
            if job is None:
                continue
            if job.started_at is None:
                job.started_at, job.state = time.monotonic(), JobState.RUNNING
            if item.end_pos < job.prompt_len:
                continue  # not the final chunk: this layer is sent once the prompt is whole
            try:
                streaming.layer_computed(job, layer, item.block_ids, self.engine.kv_caches, self._layers)  # fmt: skip
            except Exception as exc:
                logger.exception("sending layer %d of %s failed", layer, job.request_id)
                if job.sender is not None:
                    job.sender.abort(f"prefill could not send layer {layer} ({type(exc).__name__})")  # fmt: skip

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
        job.first, job.state, job.sampled_at = out, JobState.SENDING, time.monotonic()
        state = job.sender.poll() if job.sender is not None else None
        if state is TransferState.FAILED:  # known lost: D holds nothing to decode from
            self._finish(job, WorkerError(ABORTED, self._why(job)))
            return
        streaming.first_sampled(job, self.engine.kv_caches, self._layers)
        job.replied = True
        job.reply(
            prefill_response(job, self._block_bytes, self._layers)
        )  # the first token goes now (TTFT), the KV may follow
        if state is TransferState.SUCCESS:
            self._finish(job, None)  # D confirmed within the step

    def _fail_job(self, job: Job, why: str) -> None:
        """``job`` failed alone: abort its KV stream (D frees the reservation), reply
        INTERNAL, free its blocks."""
        msg = f"request {job.request_id} failed on {self.config.name}: {why}"
        if job.sender is not None:
            job.sender.abort(msg)
        job.first = None  # its blocks are not sent on: _finish frees rather than releases
        self._finish(job, WorkerError(grpc.StatusCode.INTERNAL, msg))

    def _why(self, job: Job) -> str:
        return f"KV transfer to {job.sender.ticket.endpoint} failed: {job.sender.error}"

    def _finish(self, job: Job, error: WorkerError | None) -> None:
        """Drop ``job``: release its blocks (sent) or free them; reply ``error`` unless
        the reply already left."""
        self._jobs.pop(job.request_id, None)
        self._tickets.ended(job.request_id, time.monotonic())
        if job.first is not None:
            self.engine.release(job.request_id)
        else:
            self.engine.abort(job.request_id)
        if not job.replied:
            job.replied = True
            job.reply(error or WorkerError(grpc.StatusCode.INTERNAL, "prefill ended without a token"))  # fmt: skip
