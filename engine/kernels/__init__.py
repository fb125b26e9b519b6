"""Triton kernels for paged attention, one kernel per file.

Each file holds, in order: the ``@triton.jit`` kernel(s), the launcher, the typed public
op, and ``reference`` (the pure-torch function it is tested against). The attention
backend that wires them into the engine is ``engine/attention/triton_backend.py``.

Importing this package imports ``triton``. On a machine without CUDA the kernels only run
when ``TRITON_INTERPRET=1`` was set before this package was first imported (tests do it
in ``tests/kernels/conftest.py``).
"""

from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.paged_prefill_attention import paged_prefill_attention
from engine.kernels.store_kv import store_kv

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
