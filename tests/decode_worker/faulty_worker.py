"""Test-only launcher of the real ``pdserve`` CLI whose engine loop can be made to die.

``python -m tests.decode_worker.faulty_worker worker --role decode ...`` runs
``router.launch.cli.main`` unchanged, except that after SIGUSR1 the engine's next step raises,
as a failed batch forward would. Production code has no such switch."""

from __future__ import annotations

import signal
import sys

from engine.engine import LLMEngine
from router.launch.cli import main

_armed = False
_step = LLMEngine.step
_has_work = LLMEngine.has_unfinished_requests


def _arm(*_) -> None:
    global _armed
    _armed = True


def _failing_step(self):
    if _armed:
        raise RuntimeError("injected by the test hook (SIGUSR1): the batch forward failed")
    return _step(self)


LLMEngine.step = _failing_step
LLMEngine.has_unfinished_requests = lambda self: _armed or _has_work(self)

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _arm)
    sys.exit(main(sys.argv[1:]))
