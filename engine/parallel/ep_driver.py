"""Expert parallelism's step: data-parallel attention around the EP MoE layers.

Each rank runs only the sequences homed on it (engine/parallel/ep_kv.py); a rank with
none still joins every MoE layer's collectives with zero rows. Each rank then sends the
final hidden row of each of its sampling sequences to the leader (``gather_to_leader``),
which samples for all of them. Around the step the leader moves KV point to point
(engine/parallel/kv_relay.py): blocks a decode request received by transfer go to its
home rank, and a prefill-only sequence homed on a follower has its new K/V pushed to the
leader after each layer, for the KV layer hook.
"""

from __future__ import annotations

import torch

from engine.kv_handoff import LayerKV
from engine.layers.moe import SparseMoE
from engine.model_runner import ModelRunner
from engine.parallel.ep import gather_to_leader
from engine.parallel.ep_kv import EPCacheManager
from engine.parallel.expert_load import ExpertCountSync
from engine.parallel.kv_relay import pull_hook, pull_slots, push_hook, recv_blocks, send_blocks
from engine.parallel.state import ParallelState
from engine.parallel.step_sync import IDLE, StepMessage, broadcast_step
from engine.scheduler_output import ScheduledSequence, SchedulerOutput, StepResult


def home_step(so: SchedulerOutput, homes: dict[str, int], rank: int) -> SchedulerOutput:
    """The part of a step that ``rank`` runs: its home sequences, decodes still first."""
    seqs = tuple(s for s in so.sequences if homes.get(s.request_id, 0) == rank)
    decodes = sum(1 for s in seqs if s.num_tokens == 1)
    return SchedulerOutput(seqs, decodes, so.finished_request_ids)


def sampling_by_rank(
    so: SchedulerOutput, homes: dict[str, int], size: int
) -> list[list[ScheduledSequence]]:
    """Sampling sequences per home rank, in step order (the leader's row order)."""
    out: list[list[ScheduledSequence]] = [[] for _ in range(size)]
    for s in so.sequences:
        if s.sample:
            out[homes.get(s.request_id, 0)].append(s)
    return out


def _pulls(items: list[LayerKV]) -> list[tuple[str, int, int]]:
    return [(i.request_id, i.start_pos, i.end_pos) for i in items]


class EPDriver:
    def __init__(self, runner: ModelRunner, parallel: ParallelState, kv: EPCacheManager) -> None:
        self.runner, self.kv = runner, kv
        self.ep = parallel.ep
        self.group = parallel.control_group
        self.expert_sync = ExpertCountSync(runner.model, self.ep)
        self._forward: dict[int, list[int]] = {}
        """Leader: home rank -> blocks that arrived by transfer, to send it next step."""

    # -- leader ---------------------------------------------------------------------------
    def execute(self, so, items, hook):
        homes = {s.request_id: self.kv.home(s.request_id) for s in so.sequences}
        forward, self._forward = self._forward, {}
        broadcast_step(StepMessage(so, items, homes, forward), self.group)
        send_blocks(self.runner.kv_caches, forward, self.ep)
        bs, pulls = self.runner.block_size, _pulls(items)
        slots = {r: pull_slots(so, pulls, homes, r, bs) for r in range(1, self.ep.size)}
        slots = {r: s for r, s in slots.items() if s.numel()}
        if slots:
            hook = pull_hook(self.runner.kv_caches, slots, self.ep, hook)
        return self._run(so, homes, hook)

    def admitted(self, request_id, block_ids):
        """Transferred blocks go to the request's home rank with the next step (prefix
        hits are already there: a hit is only valid on its own home)."""
        home = self.kv.home(request_id)
        if home != 0 and block_ids:
            self._forward.setdefault(home, []).extend(block_ids)

    def heartbeat(self):
        broadcast_step(StepMessage(IDLE), self.group)

    def stop(self):
        broadcast_step(StepMessage(None), self.group)

    def expert_counts(self):
        return self.expert_sync.total

    # -- follower -------------------------------------------------------------------------
    def follow(self, msg, hook):
        caches, rank = self.runner.kv_caches, self.ep.rank
        recv_blocks(caches, msg.kv_forward.get(rank, []), self.ep)
        slots = pull_slots(msg.step, _pulls(msg.items), msg.homes, rank, self.runner.block_size)
        self._run(msg.step, msg.homes, push_hook(caches, slots, self.ep) if slots.numel() else None)

    # -- every rank -----------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, so: SchedulerOutput, homes: dict[str, int], hook) -> StepResult:
        if so.is_empty:
            return StepResult({})
        local = home_step(so, homes, self.ep.rank)
        by_rank = sampling_by_rank(so, homes, self.ep.size)
        sampling = [s for seqs in by_rank for s in seqs]
        leader = self.ep.is_leader
        controls = self.runner.begin(sampling) if leader else None  # before the forward
        if local.sequences:  # a prompt to score is homed on the leader (ep_kv.py)
            rows, prompt_lps = self.runner.forward(local, hook)
        else:
            rows, prompt_lps = self._idle_forward(hook), {}
        rows = gather_to_leader(rows, [len(seqs) for seqs in by_rank], self.ep)
        self.expert_sync.step()
        if not leader:
            return StepResult({})
        return self.runner.sample(sampling, rows, controls, prompt_lps)

    def _idle_forward(self, hook):
        """No sequences here this step: zero rows through every MoE layer's collectives
        (the other ranks' tokens may need this rank's experts)."""
        model = self.runner.model
        weight = model.embed.weight
        x = weight.new_empty(0, weight.shape[1])
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp(x)
            if hook is not None:
                hook(i)
        return x
