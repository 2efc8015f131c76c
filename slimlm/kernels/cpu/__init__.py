"""Build (once per machine) and load the C++ CPU kernels in ``ops.cpp`` / ``bindings.cpp``.

The extension is compiled with ``torch.utils.cpp_extension`` (``-O3 -march=native``, OpenMP; 15-30 s)
into ``<cache>/kernels/cpu_ops-<key>`` by ``slimlm.kernels.build`` (the key hashes the sources, the torch
and Python versions, the compiler flags and the CPU's model and feature flags); a later process imports
the finished ``.so`` directly (about 1 ms).

``SLIMLM_CPU_CFLAGS`` appends compiler flags (part of the key), e.g. ``-march=x86-64-v3`` for a build
that other machines can share, or ``-DSLIMLM_SCALAR`` to test the portable non-SIMD code path.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

from slimlm.kernels import build

SOURCES = ("ops.cpp", "bindings.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module: ModuleType | None = None


def _sources() -> list[Path]:
    here = Path(__file__).parent
    return [here / name for name in SOURCES]


def _cflags() -> list[str]:
    return [*CFLAGS, *os.environ.get("SLIMLM_CPU_CFLAGS", "").split()]


def build_key() -> str:
    return build.build_key(_sources(), [*_cflags(), *LDFLAGS])


def build_dir(key: str) -> Path:
    return build.build_dir("cpu_ops", key)


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension module, building it on first use. Raises if the build fails."""
    global _module
    with _lock:
        if _module is None:
            _module = build.load_extension("cpu_ops", _sources(), _cflags(), LDFLAGS, verbose=verbose)
        return _module
