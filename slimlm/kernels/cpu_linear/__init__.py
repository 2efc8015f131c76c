"""Fast CPU linear for bf16 and fp32 weights: ``load().linear(x, w, bias_or_None)``.

``y = x @ w.T + bias`` with ``x`` [..., K] float32 or bfloat16 (any row stride; last dim unit
stride or it is copied), ``w`` [N, K] bfloat16 or float32, ``bias`` [N] or None; fp32 math and
an output in ``x``'s dtype. Inference only (no autograd). Small M streams W once through a
hand-written AVX-512 (or AVX2/FMA) kernel; on AVX-512 CPUs middle M (batched decode) runs a packed
outer-product GEMM (``packed_gemm.h``); large M converts W to fp32 in chunks and runs sgemm on them. On CPUs
with AMX, bf16 x and W take a tile kernel that reads W in place (``amx_bf16.h``) from M = 6 (7 for K > 2048)
and oneDNN's bf16 GEMM at large M instead (``config()`` has the crossovers).

The extension is compiled on first use (``-O3 -march=native -fopenmp``, ~25 s) and cached under
``<cache>/kernels/cpu_linear-<hash>`` by ``slimlm.kernels.build`` (the hash covers the source, the torch
and Python versions, the compiler flags and the CPU's flags); later processes import the finished
``.so`` directly. The module's functions are raw pybind functions (no Python in the call path):

- ``linear(x, weight, bias=None)``: the op; streaming kernel for M up to a measured crossover
  (``config()``), fp32-chunk + sgemm path above it.
- ``linear_path(x, weight, bias, path)``: 1 forces the streaming kernel, 2 the sgemm path (oneDNN for bf16
  x and W on CPUs with native bf16), 3 the packed GEMM (AVX-512 builds; elsewhere an error), 4 the AMX tile
  kernel (AMX builds; elsewhere an error) (tests).
- ``config()``: the crossovers and tuning constants of this build.
- ``read_probe(t)``, ``set_chunk_rows(n)``: benchmark helpers.
"""

from __future__ import annotations

import threading
from pathlib import Path

from slimlm.kernels import build
from slimlm.kernels.build import cpu_flags

_SRC = Path(__file__).with_name("linear.cpp")
_COMMON = Path(__file__).parent.parent / "common"
_DEPENDS = (
    _COMMON / "parallel.h",
    _COMMON / "gil.h",
    _COMMON / "avx512_bf16.h",
    _COMMON / "amx.h",
    _COMMON / "scratch.h",
    _COMMON / "store.h",
    Path(__file__).with_name("packed_gemm.h"),
    Path(__file__).with_name("amx_bf16.h"),
    Path(__file__).with_name("dp_gemm.h"),
)
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_modules: dict[tuple, object] = {}


def available() -> bool:
    """Whether this CPU can run the kernel (x86-64 with AVX2 and FMA)."""
    flags = set(cpu_flags().split())
    return {"avx2", "fma"} <= flags


def _cflags(defines: dict[str, int] | None) -> list[str]:
    return [*_CFLAGS, *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]


def build_key(flags: str, defines: dict[str, int] | None = None) -> str:
    """Cache key of a build: source, torch version, compiler flags and the CPU's ``flags`` line."""
    return build.build_key([_SRC, *_DEPENDS], [*_cflags(defines), *_LDFLAGS], cpu=flags)


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
        cflags = _cflags(dict(key))
        mod = build.load_extension(
            "cpu_linear",
            [_SRC],
            cflags,
            _LDFLAGS,
            depends=_DEPENDS,
            key=build_key(cpu_flags(), dict(key)),
            verbose=verbose,
        )
        _modules[key] = mod
        return mod


def linear(x, weight, bias=None):
    """Convenience wrapper: ``load().linear(x, weight, bias)``."""
    return load().linear(x, weight, bias)


__all__ = ["available", "build_key", "cpu_flags", "linear", "load"]
