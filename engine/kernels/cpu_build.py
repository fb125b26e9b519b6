"""Builds the CPU kernels (``csrc/*.c``) into one shared library, once per machine.

The sources are compiled with the system C compiler (``-O3 -march=native -fopenmp``)
into ``$PDSERVE_CACHE/kernels`` (default ``~/.cache/pdserve/kernels``), keyed by a hash
of the sources, compiler, flags and the CPU's feature flags, under a file lock so that
concurrent processes (tests, Ray workers) build it once; the library is loaded with
ctypes after torch, so its OpenMP calls resolve to the runtime torch already loaded
(same soname, ``libgomp.so.1``). With no compiler, or a failed build, :func:`library`
returns ``None`` and every caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


def cache_dir() -> Path:
    root = os.environ.get("PDSERVE_CACHE") or str(Path.home() / ".cache" / "pdserve")
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _sources() -> dict[str, str]:
    root = resources.files("engine.kernels").joinpath("csrc")
    names = sorted(p.name for p in root.iterdir() if p.name.endswith((".c", ".h")))
    return {name: root.joinpath(name).read_text() for name in names}


def _compile(sources: dict[str, str], cc: str, out: Path) -> None:
    """Compile into a temp dir beside ``out`` and rename, under a lock."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            for name, text in sources.items():
                (Path(tmp) / name).write_text(text)
            c_files = [str(Path(tmp) / n) for n in sources if n.endswith(".c")]
            so_file = Path(tmp) / "kernels.so"
            cmd = [cc, *FLAGS, "-I", tmp, "-o", str(so_file), *c_files, "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
            os.replace(so_file, out)


@cache
def _load() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        logger.warning("no C compiler found: the CPU kernels are off (torch paths run)")
        return None
    sources = _sources()
    blob = "\0".join([*sources.values(), cc, *FLAGS, _cpu_flags()])
    out = cache_dir() / f"cpu_kernels-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.so"
    try:
        if not out.exists():
            logger.info("compiling the CPU kernels into %s", out)
            _compile(sources, cc, out)
        return ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels unavailable (%s): torch paths run", detail)
        return None


_declared: set[Callable] = set()


def library(declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The loaded library (``None`` if it cannot be built), after ``declare(lib)`` has set
    the argument types of the caller's functions (once per caller)."""
    lib = _load()
    if lib is not None and declare not in _declared:
        declare(lib)
        _declared.add(declare)
    return lib
