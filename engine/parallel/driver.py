"""How one engine step runs across the ranks of a replica: the engine hands every step to
a :class:`StepDriver` and never knows how many ranks there are.

    LocalDriver  one rank: the model runner as it is
    TPDriver     tensor-parallel leader: broadcast the step, run it (the layers' all-reduce
                 and the LM head's gather meet the followers'), sample once
    EPDriver     expert-parallel (engine/parallel/ep_driver.py)

A follower rank runs :func:`run_follower`: it receives each step and runs it with its own
shard (``driver.follow``), its role's KV hook added (``FollowerRole``: a TP prefill rank
sends its heads of the prefill-only sequences), until the leader sends ``stop``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from engine.kv_handoff import LayerKV
from engine.model_runner import ModelRunner
from engine.parallel.expert_load import expert_counts
from engine.parallel.state import ParallelState
from engine.parallel.step_sync import IDLE, StepMessage, broadcast_step, receive_step
from engine.scheduler_output import SchedulerOutput, StepResult

logger = logging.getLogger(__name__)

LayerHook = Callable[[int], None]


class StepDriver(Protocol):
    def execute(
        self, so: SchedulerOutput, items: list[LayerKV], hook: LayerHook | None
    ) -> StepResult:
        """Leader (or the one rank): run the step everywhere; the sampled tokens."""

    def follow(self, msg: StepMessage, hook: LayerHook | None) -> None:
        """Follower: run the leader's step with this rank's shard."""

    def admitted(self, request_id: str, block_ids: list[int]) -> None:
        """Leader: ``block_ids`` of a request arrived by KV transfer into this rank."""

    def heartbeat(self) -> None:
        """Leader, idle: show the followers the leader is alive (an empty step)."""

    def stop(self) -> None:
        """Leader: release the followers from :func:`run_follower`."""

    def expert_counts(self) -> torch.Tensor | None:
        """Leader: ``[num_experts]`` tokens routed per expert since start, every rank's."""


class FollowerRole(Protocol):
    """What a worker role adds on a follower rank (prefill_worker/tp.py, decode_worker/tp.py)."""

    def step_hook(self, msg: StepMessage) -> LayerHook | None:
        """The KV layer hook of this rank for ``msg`` (``None``: nothing to send)."""

    def close(self) -> None: ...


class LocalDriver:
    """A single rank: nothing to broadcast."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, so, items, hook):
        return self.runner.execute(so, hook)

    def follow(self, msg, hook):
        raise RuntimeError("a single-rank engine has no leader to follow")

    def admitted(self, request_id, block_ids):
        pass

    def heartbeat(self):
        pass

    def stop(self):
        pass

    def expert_counts(self):
        return expert_counts(self.runner.model)


class TPDriver(LocalDriver):
    """Tensor parallelism: every rank runs every sequence, with its shard of each layer."""

    def __init__(self, runner: ModelRunner, parallel: ParallelState) -> None:
        super().__init__(runner)
        self.group = parallel.control_group

    def execute(self, so, items, hook):
        broadcast_step(StepMessage(so, items), self.group)
        return self.runner.execute(so, hook)

    def follow(self, msg, hook):
        self.runner.follow(msg.step, hook)

    def heartbeat(self):
        broadcast_step(StepMessage(IDLE), self.group)

    def stop(self):
        broadcast_step(StepMessage(None), self.group)


def run_follower(
    driver: StepDriver, parallel: ParallelState, role: FollowerRole | None = None
) -> int:
    """Execute the leader's steps until it stops; returns the number of steps run."""
    steps = 0
    while (msg := receive_step(parallel.control_group)).step is not None:
        hook = role.step_hook(msg) if role is not None and msg.items else None
        driver.follow(msg, hook)
        steps += not msg.step.is_empty
    logger.info("%s follower rank %d stopped after %d steps", parallel.kind.upper(), parallel.rank, steps)  # fmt: skip
    return steps
