"""A request's ``n`` choices: the prompt computed once, then shared in the KV cache.

    choice 0 ──routed, prefilled──> first output ──> choices 1..n-1 start
                                                      (routed like any request: the
                                                      prefix index sends them where
                                                      choice 0's blocks are cached, and
                                                      they compute only the last,
                                                      partial block)

As SGLang and vLLM do for ``n`` > 1, the sharing is the prefix cache: the later choices
report the shared blocks as ``cached_tokens``. Outputs of all choices interleave as
``(index, Output)``; one choice failing ends the request (the others are aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from router.run import Job, Output

if TYPE_CHECKING:
    from router.service import RouterService

_END = object()


async def run_choices(service: RouterService, jobs: list[Job]) -> AsyncIterator[tuple[int, Output]]:
    if len(jobs) == 1:
        async for out in service.generate(jobs[0]):
            yield 0, out
        return
    service.admit(len(jobs))  # every choice's slot, before the first runs
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(service, jobs[0], queue))]
    started, running = False, 1
    try:
        while running:
            job, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield job.index, item
            if not started and job.index == 0:  # choice 0's prompt is in the cache now
                started = True
                for j in jobs[1:]:
                    tasks.append(asyncio.ensure_future(_pump(service, j, queue)))
                running += len(jobs) - 1
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _pump(service: RouterService, job: Job, queue: asyncio.Queue) -> None:
    outs = service.generate(job, admit=False)
    try:
        async for out in outs:
            queue.put_nowait((job, out))
    except Exception as exc:
        queue.put_nowait((job, exc))
    finally:
        await outs.aclose()
        queue.put_nowait((job, _END))
