"""Process defaults of a worker or an EP rank (a Ray actor or ``pdserve worker``)."""

from __future__ import annotations

import logging
import os


def _reset_niceness() -> None:
    """Ray starts worker processes at nice 15, below the router and any client on the
    host; a serving worker belongs at nice 0. Every existing thread is reset (threads
    started later inherit it); where the OS refuses (no CAP_SYS_NICE), Ray's value stays."""
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (OSError, AttributeError) as exc:
        logging.getLogger(__name__).info("worker stays at nice %d: %s", os.nice(0), exc)


def setup_worker_process() -> None:
    """Process defaults for a worker or EP rank: nice 0, one OpenMP thread, logging."""
    _reset_niceness()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
