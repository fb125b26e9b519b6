"""KV pages between CUDA caches over every backend, bit for bit: tcp and shm stage through
host memory, ucx moves device memory, torch_dist uses NCCL (two devices: one per side)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.layout import gather_blocks
from engine.kv_cache.spec import KVLayoutSpec
from kv_transfer import TransferState, backend_names, make_client, make_endpoint
from tests.kv_transfer.conftest import FAST, BlockPool, random_caches, tiny_layout, wait_until

from .conftest import device, needs_two_devices

pytestmark = pytest.mark.gpu


def _params():
    for name in backend_names():
        marks = [needs_two_devices] if name == "torch_dist" else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("backend", list(_params()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_between_cuda_caches(backend, dtype):
    layout = tiny_layout(dtype)
    spec = KVLayoutSpec.from_layout(layout, "test-model")
    send_on = device(1) if backend == "torch_dist" else device(0)  # NCCL: one rank per device
    pool, dst = BlockPool(layout.num_blocks), layout.allocate(device(0))
    src = [(k.to(send_on), v.to(send_on)) for k, v in random_caches(layout, 3)]
    endpoint = make_endpoint(backend, layout, dst, spec, pool.free, config=FAST)
    client = make_client(backend, spec, config=FAST)
    try:
        dst_ids, src_ids = pool.allocate(5), [9, 0, 31, 4, 17]
        rx = endpoint.expect(dst_ids, lease_s=60)
        tx = client.open(rx.ticket)
        for layer, (k, v) in enumerate(src):
            tx.send_layer(layer, k, v, src_block_ids=src_ids)
        tx.finish()
        wait_until(lambda: rx.poll().terminal and tx.poll().terminal, timeout=60)
        assert (rx.poll(), tx.poll()) == (TransferState.SUCCESS,) * 2, (rx.error, tx.error)
        for layer in range(layout.num_layers):
            for kv in (0, 1):
                got = gather_blocks(dst[layer][kv], dst_ids).cpu()
                want = gather_blocks(src[layer][kv], src_ids).cpu()
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (layer, kv)
        pool.free(dst_ids)
    finally:
        client.close()
        endpoint.close()
    assert not pool.double_frees and pool.num_free == pool.total
