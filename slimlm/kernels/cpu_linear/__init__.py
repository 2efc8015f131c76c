"""Fast CPU linear for bf16 and fp32 weights: ``load().linear(x, w, bias_or_None)``.

``y = x @ w.T + bias`` with ``x`` [..., K] float32 or bfloat16 (any row stride; last dim unit
stride or it is copied), ``w`` [N, K] bfloat16 or float32, ``bias`` [N] or None; fp32 math and
an output in ``x``'s dtype. Inference only (no autograd). Small M streams W once through a
hand-written AVX2/FMA kernel; large M converts W to fp32 in chunks and runs sgemm on them.

The extension is compiled on first use (``-O3 -march=native -fopenmp``, ~25 s) and cached under
``<cache>/kernels/linear-<hash>`` (``<cache>`` = ``$SLIMLM_CACHE_DIR`` or ``~/.cache/slimlm``), the
hash covering the source, the torch and Python versions, the compiler flags and the CPU's flags,
so a build for one CPU is never loaded on another; later processes import the finished ``.so``
directly. The module's functions are raw pybind functions (no Python in the call path):

- ``linear(x, weight, bias=None)``: the op; streaming kernel for M up to a measured crossover
  (``config()``), fp32-chunk + sgemm path above it.
- ``linear_path(x, weight, bias, path)``: 1 forces the streaming kernel, 2 the GEMM path (tests).
- ``config()``: the crossovers and tuning constants of this build.
- ``read_probe(t)``, ``set_chunk_rows(n)``: benchmark helpers.
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

_SRC = Path(__file__).with_name("linear.cpp")
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_modules: dict[tuple, object] = {}


def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo (or the platform's best equivalent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() + platform.machine()


def available() -> bool:
    """Whether this CPU can run the kernel (x86-64 with AVX2 and FMA)."""
    flags = set(cpu_flags().split())
    return {"avx2", "fma"} <= flags


def _cache_root() -> Path:
    """``$SLIMLM_CACHE_DIR/kernels`` or ``~/.cache/slimlm/kernels`` (same root as kernels/cpu)."""
    root = os.environ.get("SLIMLM_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimlm" / "kernels"


def _import_so(name: str, path: Path):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build_key(flags: str, defines: dict[str, int] | None = None) -> str:
    """Cache key of a build: source, torch version, compiler flags and the CPU's flags."""
    import torch

    cflags = [*_CFLAGS, *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]
    h = hashlib.sha256()
    for part in (
        _SRC.read_bytes(),
        torch.__version__.encode(),
        sys.version.encode(),
        " ".join([*cflags, *_LDFLAGS]).encode(),
        flags.encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def load(defines: dict[str, int] | None = None, verbose: bool = False):
    """Build (once per source/torch/CPU) and import the extension; returns the module.

    ``defines`` overrides compile-time tuning constants (benchmarks only), e.g.
    ``{"SLIMLM_SMALL_MAX_BF16_LONG_K": 64}`` or ``{"SLIMLM_SERIAL_BACKOFF": 0}`` (no fallback to
    one thread after a call that waited for a descheduled worker).
    """
    key = tuple(sorted((defines or {}).items()))
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        if not available():
            raise RuntimeError("slimlm cpu_linear needs an x86-64 CPU with AVX2 and FMA")
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        cflags = [*_CFLAGS, *(f"-D{k}={v}" for k, v in key)]
        digest = build_key(cpu_flags(), dict(key))
        name = f"slimlm_cpu_linear_{digest}"
        build_dir = _cache_root() / f"linear-{digest}"
        so = build_dir / f"{name}.so"
        if so.exists() and not (build_dir / "lock").exists():
            mod = _import_so(name, so)  # finished build: no ninja run
        else:
            from torch.utils import cpp_extension

            for attempt in range(2):  # once more if the directory vanished under a concurrent cleanup
                build_dir.mkdir(parents=True, exist_ok=True)
                try:
                    mod = cpp_extension.load(
                        name=name,
                        sources=[str(_SRC)],
                        extra_cflags=list(cflags),
                        extra_ldflags=list(_LDFLAGS),  # cpp_extension extends these lists in place
                        build_directory=str(build_dir),
                        verbose=verbose,
                    )
                    break
                except (RuntimeError, OSError):
                    if attempt or build_dir.exists():
                        raise
        _modules[key] = mod
        return mod


def linear(x, weight, bias=None):
    """Convenience wrapper: ``load().linear(x, weight, bias)``."""
    return load().linear(x, weight, bias)


__all__ = ["available", "build_key", "cpu_flags", "linear", "load"]
