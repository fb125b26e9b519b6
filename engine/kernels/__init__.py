"""Paged-attention kernels, one kernel per file: Triton (GPU) and one C kernel (CPU).

``cpu_paged_attention`` (source in ``csrc/``) is compiled with the system C compiler on
first use and needs no triton; ``engine/attention/torch_backend.py`` uses it.

Each file holds, in order: the ``@triton.jit`` kernel(s), the launcher, the typed public
op, and ``reference`` (the pure-torch function it is tested against). The attention
backend that wires them into the engine is ``engine/attention/triton_backend.py``.

Importing a Triton kernel module imports ``triton``. On a machine without CUDA the kernels only run
when ``TRITON_INTERPRET=1`` was set before this package was first imported (tests do it
in ``tests/kernels/conftest.py``).

The public ops are imported from their own modules (``from
engine.kernels.store_kv import store_kv``); this package re-exports nothing, so a module
name never shadows the op of the same name.
"""
