"""The kernels lower through the real compiler (sm_90 cubin) even with no GPU present.

The interpreter runs kernels as numpy and misses compile-only errors (types of
loop-carried values, constexpr branches, dot shapes), so ``compile_sm90.py`` compiles each
kernel with ``triton.compile`` in a fresh process, without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a warm cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_sm90.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 4, proc.stdout
