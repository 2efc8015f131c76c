"""Build (once per machine) and load the C++ CPU kernels in ``ops.cpp`` / ``bindings.cpp``.

The extension is compiled with ``torch.utils.cpp_extension`` (``-O3 -march=native``, OpenMP; 15-30 s)
into ``<cache>/kernels/cpu_ops-<key>`` by ``slimlm.kernels.build`` (the key hashes the sources, the torch
and Python versions, the compiler flags and the CPU's model and feature flags); a later process imports
the finished ``.so`` directly (about 1 ms).

``SLIMLM_CPU_CFLAGS`` appends compiler flags (part of the key), e.g. ``-march=x86-64-v3`` for a build
that other machines can share, or ``-DSLIMLM_SCALAR`` to test the portable non-SIMD code path;
``load(extra_cflags=...)`` does the same for one build (tests compare ``-DSLIMLM_NO_ATTN512``, the
8-float attention kernel, with the 512-bit one on AVX-512 CPUs).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

from slimlm.kernels import build

SOURCES = ("ops.cpp", "bindings.cpp")
HEADERS = ("attention_avx512.h",)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_modules: dict[tuple[str, ...], ModuleType] = {}


def _sources() -> list[Path]:
    here = Path(__file__).parent
    return [here / name for name in SOURCES]


def _headers() -> list[Path]:
    here = Path(__file__).parent
    return [here / name for name in HEADERS] + [here.parent / "common" / "avx512_bf16.h"]


def _cflags(extra: tuple[str, ...] = ()) -> list[str]:
    return [*CFLAGS, *os.environ.get("SLIMLM_CPU_CFLAGS", "").split(), *extra]


def build_key(extra_cflags: tuple[str, ...] = ()) -> str:
    return build.build_key([*_sources(), *_headers()], [*_cflags(extra_cflags), *LDFLAGS])


def build_dir(key: str) -> Path:
    return build.build_dir("cpu_ops", key)


def load(verbose: bool = False, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """The compiled extension module, building it on first use. Raises if the build fails."""
    extra = tuple(extra_cflags)
    with _lock:
        if extra not in _modules:
            _modules[extra] = build.load_extension(
                "cpu_ops",
                _sources(),
                _cflags(extra),
                LDFLAGS,
                depends=_headers(),
                key=build_key(extra),
                verbose=verbose,
            )
        return _modules[extra]
