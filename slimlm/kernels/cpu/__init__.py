"""Build (once per machine) and load the C++ CPU kernels in ``ops.cpp`` / ``bindings.cpp``.

The extension is compiled with ``torch.utils.cpp_extension`` (``-O3 -march=native``, OpenMP; 15-30 s)
into ``<cache>/kernels/ops-<key>``, where ``<cache>`` is ``$SLIMLM_CACHE_DIR`` or ``~/.cache/slimlm`` and
the key hashes the sources, the torch and Python versions, the compiler flags and the CPU's feature flags.
A later process finds the finished ``.so`` there and imports it directly (no ninja run): about 1 ms.
Concurrent first builds are serialised by cpp_extension's lock file in that directory.

``SLIMLM_CPU_CFLAGS`` appends compiler flags (part of the key), e.g. ``-march=x86-64-v3`` for a build
that other machines can share, or ``-DSLIMLM_SCALAR`` to test the portable non-SIMD code path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("ops.cpp", "bindings.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
_DONE = "build.ok"

_lock = threading.Lock()
_module: ModuleType | None = None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("flags", "model name", "Features", "CPU part", "vendor_id"))
    ]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _cflags() -> list[str]:
    return [*CFLAGS, *os.environ.get("SLIMLM_CPU_CFLAGS", "").split()]


def build_key() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    for part in (torch.__version__, sys.version, " ".join(_cflags() + list(LDFLAGS)), _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir(key: str) -> Path:
    root = os.environ.get("SLIMLM_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimlm"
    return base / "kernels" / f"ops-{key}"


def _import_so(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load(verbose: bool = False) -> ModuleType:
    """The compiled extension module, building it on first use. Raises if the build fails."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        key = build_key()
        name = f"slimlm_cpu_ops_{key}"
        directory = build_dir(key)
        so = directory / f"{name}.so"
        if (directory / _DONE).exists() and so.exists():
            _module = _import_so(name, so)
            return _module
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).parent
        _module = cpp_extension.load(
            name=name,
            sources=[str(here / s) for s in SOURCES],
            extra_cflags=_cflags(),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=verbose,
        )
        tmp = directory / f"{_DONE}.{os.getpid()}"
        tmp.write_text(torch.__version__ + "\n")
        tmp.replace(directory / _DONE)
        return _module
