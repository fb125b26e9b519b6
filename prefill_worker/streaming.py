"""One prefill job's KV on its way out: each layer of its final chunk goes into the blocks
its ticket names as soon as both exist -- the layer computed, the ticket attached::

    layer computed (hook)   ticket attached?  yes -> send_layer now
                                              no  -> job.computed (the KV stays in this
                                                     worker's blocks until the job ends)
    ticket attached         every layer in job.computed -> send_layer, in order
    first token sampled     the last layer, held back until then (prefill_worker/worker.py)
    every layer sent        finish()

Everything here runs on the engine thread (the hook runs inside the batch's forward).

    prefill block table:  [ cached on D | blocks to fill ... ]
                            0 .. nc-1     nc .. nc+len(ticket)-1  -> ticket.block_ids
"""

from __future__ import annotations

import grpc
import torch

from engine.worker.errors import WorkerError
from kv_transfer import KVSender
from prefill_worker.commands import Job


def check_fits(prompt_len: int, block_size: int, sender: KVSender, num_cached: int) -> None:
    """INVALID_ARGUMENT unless the ticket names the prompt's blocks D does not hold."""
    need = -(-prompt_len // block_size) - num_cached
    have = len(sender.ticket.block_ids)
    if need != have:
        raise WorkerError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"ticket has {have} blocks but a {prompt_len}-token prompt with {num_cached} "
            f"cached blocks needs {need} (block_size={block_size})",
        )


def layer_computed(
    job: Job, layer: int, block_ids: tuple[int, ...], caches, num_layers: int
) -> None:
    """The final chunk's ``layer`` is in this worker's cache: send it if the ticket is here."""
    job.block_ids = block_ids
    job.computed.append(layer)
    if job.sender is not None and _ready(job, layer, num_layers):
        _send(job, layer, caches[layer], num_layers)


def attach(job: Job, sender: KVSender, num_cached: int, caches, num_layers: int) -> None:
    """The ticket arrived: send what is computed already; the hook sends the rest."""
    job.sender, job.num_cached_blocks = sender, num_cached
    for layer in job.computed:
        if _ready(job, layer, num_layers):
            _send(job, layer, caches[layer], num_layers)


def first_sampled(job: Job, caches, num_layers: int) -> None:
    """The first token is sampled (``job.first``): the held last layer may go."""
    last = num_layers - 1
    if job.sender is None:
        return  # attach sends it with the others
    if last in job.computed:
        _send(job, last, caches[last], num_layers)
    else:
        job.sender.abort("prefill finished without computing its last layer")


def _ready(job: Job, layer: int, num_layers: int) -> bool:
    """The last layer completes D's transfer, so it waits for a good first token."""
    return layer < num_layers - 1 or job.first is not None


def _send(job: Job, layer: int, cache: tuple[torch.Tensor, torch.Tensor], num_layers: int) -> None:
    nc, n = job.num_cached_blocks, len(job.sender.ticket.block_ids)
    try:
        job.sender.send_layer(layer, cache[0], cache[1], src_block_ids=job.block_ids[nc : nc + n])
    except ValueError as exc:
        job.sender.abort(f"prefill could not send layer {layer}: {exc}")
        return
    job.sent_layers += 1
    if job.sent_layers == num_layers:
        job.sender.finish()
