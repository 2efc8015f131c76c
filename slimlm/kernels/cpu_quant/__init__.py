"""Quantized linear kernels for x86-64 CPUs with AVX2 + FMA: ``prepare(...)`` returns a ``(x, bias) -> y`` callable.

The callable is a prepared C++ object (``qlinear.cpp``, SIMD kernels in ``int_kernels.h``; no Python in its
call path) holding the weight in the kernel's layout, built once from the canonical form of
``slimlm.model.quantized_weight``:

- 2/3/4-bit int codes and NF4 codes: unsigned nibbles (``code + 8`` for int, the table index for NF4), two
  per byte; in each unit of 64 weights byte ``j`` holds weight ``j`` (low nibble) and ``j + 32`` (high), so
  one 32-byte load and two masks give two vectors of 32 codes.
- 8-bit codes: the int8 codes as they are.
- fp32 scales ``[N, G]``; for asymmetric codes the zero in stored units (``zero_point + 8`` for nibbles).
- act-order ``g_idx`` whose groups are a permutation of contiguous equal groups: the columns are permuted
  once so the groups become contiguous, and x's columns are gathered through the same permutation per call.

Up to ``small_max`` rows of x the integer (vector) kernels run (x quantized to int8 per block of 64-256 inputs,
``maddubs``), which change the result slightly: x's rounding (absmax / 254 per input) gives a relative
error of 6e-3 to 8e-3 against the fp32 reference on Gaussian x (tested: <= 1e-2), more where a block of x
holds an outlier, as with llama.cpp's int8 activations. Above it, W is dequantized exactly as the reference
does, in chunks, and multiplied by sgemm (on CPUs with AMX or AVX512-BF16 and bf16 x: rounded to bf16, as a
bf16 model's reference does, and multiplied by oneDNN's bf16 GEMM, or, on AVX512-BF16 CPUs without AMX up to
1024 rows, by slimlm's vdpbf16ps GEMM one 64-row panel at a time). W8A8 always runs the integer kernel,
bit-exact with the reference.
On CPUs with AMX-INT8 the integer scheme runs on the tile unit (``amx_rows`` in ``qlinear.cpp``) from ``small_max`` to
``tile_max`` rows, with the same results.
Cases these kernels do not cover (g_idx that are not a permutation of contiguous groups, group sizes other
than 32 or a multiple of 64) make ``prepare`` return None (the dispatch then runs the reference).

The extension is built on first use by ``slimlm.kernels.build`` (``-O3 -march=native``, ~30 s) and cached.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

import torch

from slimlm.kernels import build

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "qlinear.cpp",)
_DEPENDS = (
    _HERE / "int_kernels.h",
    _HERE.parent / "common" / "amx.h",
    _HERE.parent / "common" / "avx512_bf16.h",
    _HERE.parent / "common" / "scratch.h",
    _HERE.parent / "common" / "store.h",
    _HERE.parent / "common" / "parallel.h",
    _HERE.parent / "common" / "gil.h",
    _HERE.parent / "cpu_linear" / "dp_gemm.h",
)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-DNDEBUG")
_LDFLAGS = ("-fopenmp",)

KIND_U4, KIND_S8, KIND_NF4 = 0, 1, 2
CHANNEL_BLOCK = 128  # x-quantization block of channel-wise weights (a group size gives its own)

# Largest M that runs the integer kernel; above it dequantize + sgemm. Measured on the 2-core Zen 3 (one
# thread, cold 11264x2048 weight, vs the sgemm path): int4 int kernel 1.24x at M=256, 0.91x at 512; int8
# equal at 256, 0.91x at 512; NF4's signed LUT kernel is slower (about bf16 speed from M=4 up), equal near 96.
SMALL_MAX_AVX2 = {KIND_U4: 320, KIND_S8: 256, KIND_NF4: 96}
# With AVX-512 sgemm runs twice as wide while the integer kernels stay 256-bit, so the sgemm path wins much
# sooner. Measured on the 2-core Ice Lake VM (2 threads, cold tinyllama gate_up 11264x2048 and down 2048x5632,
# integer kernel time / sgemm path time): int8 M=80 0.95 and 0.99, M=112 1.12 and 1.02; int4 M=112 1.04 and
# 0.91, M=128 1.07 and 0.90, M=160 1.27 and 0.95; NF4 M=48 1.09 and 0.90, M=80 1.25 and 1.17.
SMALL_MAX_AVX512 = {KIND_U4: 128, KIND_S8: 96, KIND_NF4: 48}
# With AVX512-BF16 but no AMX (Zen 4/5) the path above the integer kernels dequantizes to bf16 for oneDNN's bf16
# GEMM, which overtakes them sooner. Measured on a 2-core Zen 4 VM (2 threads, cold tinyllama gate_up, down and
# qkv, GEMM path time / integer kernel time): int8 M=32 1.26-1.74, M=64 0.89-1.13, M=128 0.63-0.89; int4 M=64
# 1.10-1.27, M=128 0.76-0.92.
SMALL_MAX_NATIVE_BF16 = {KIND_U4: 96, KIND_S8: 64, KIND_NF4: 48}
# With AMX-INT8 the same integer scheme runs on the tile unit above these M (not for group size 32, whose two
# scales per x-block the tiles do not split). Measured on a 2-core AMX KVM guest (2 threads, cold tinyllama
# gate_up 11264x2048 and down 2048x5632, us, vector kernel / tile kernel): int4 M=6 1173/1266 and 560/622, M=8
# 1538/1300 and 799/661; int8 M=4 1155/1274 and 581/596, M=5 1333/1318 and 689/615; NF4 M=4 1183/1306 and
# 634/657, M=5 1504/1368 and 792/657; W8A8 (int8 rows) M=3 1446/1397 and 737/588.
# The tile kernel takes over the vector kernel's M range only, up to SMALL_MAX_AVX512, so results are the same
# on every x86 CPU (prefill-sized calls, perplexity windows included, stay exact dequantize + sgemm).
SMALL_MAX_AMX = {KIND_U4: 6, KIND_S8: 4, KIND_NF4: 4}


def small_max(kind: int, flags: str | None = None, tiles: bool = True) -> int:
    """The vector integer kernel's largest M for ``kind`` on a CPU with these ``/proc/cpuinfo`` flags (this one).

    ``tiles``: whether the weight can take the AMX kernel (any layout but group size 32).
    """
    names = (build.cpu_flags() if flags is None else flags).split()
    if tiles and has_amx(names):
        return SMALL_MAX_AMX[kind]
    if "avx512_bf16" in names:
        return SMALL_MAX_NATIVE_BF16[kind]
    return (SMALL_MAX_AVX512 if "avx512f" in names else SMALL_MAX_AVX2)[kind]


def tile_max(kind: int, w8a8: bool, flags: str | None = None) -> int:
    """The AMX kernel's largest M (0: none): the integer scheme's range, and every M for W8A8 (bit-exact)."""
    names = (build.cpu_flags() if flags is None else flags).split()
    if not has_amx(names):
        return 0
    return 1 << 62 if w8a8 else SMALL_MAX_AVX512[kind]


def has_amx(flags: list[str]) -> bool:
    return {"amx_int8", "amx_tile"} <= set(flags)


_lock = threading.Lock()
_modules: dict[tuple, ModuleType] = {}


def available() -> bool:
    """Whether this CPU can run the kernels (x86-64 with AVX2 and FMA)."""
    return {"avx2", "fma"} <= set(build.cpu_flags().split())


def load(defines: dict[str, int] | None = None, verbose: bool = False) -> ModuleType:
    """Builds (once per source/torch/CPU) and imports the extension. ``defines``: tuning constants (benchmarks)."""
    key = tuple(sorted((defines or {}).items()))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            if not available():
                raise RuntimeError("slimlm cpu_quant needs an x86-64 CPU with AVX2 and FMA")
            cflags = [*_CFLAGS, *(f"-D{k}={v}" for k, v in key)]
            mod = build.load_extension("cpu_quant", _SOURCES, cflags, _LDFLAGS, depends=_DEPENDS, verbose=verbose)
            _modules[key] = mod
        return mod


def _contiguous_groups(g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """The column permutation that makes act-order groups contiguous, or None if there is none."""
    k = g_idx.numel()
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], torch.arange(k) // group):
        return None
    return perm


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 ``[N, Kp]`` -> ``[N, Kp / 2]``: byte j of each 64-unit holds j (low) and j + 32 (high)."""
    n, kp = u.shape
    units = u.view(n, kp // 64, 2, 32)
    return (units[:, :, 0] | (units[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def _layout(k: int, group: int, channelwise: bool, w8a8: bool) -> tuple[int, int, int] | None:
    """``(Kp, inputs per scale, x-block)``: K padded to whole 64-input units and x-blocks, or None."""
    if w8a8:  # one x-block: the per-token scale
        kp = -(-k // 64) * 64
        return kp, kp, kp
    if channelwise:
        kp = -(-k // CHANNEL_BLOCK) * CHANNEL_BLOCK
        return kp, kp, CHANNEL_BLOCK
    if group == 32:  # x-blocks of 64 with two scales each; K padded with a zero-scale group if odd
        return -(-k // 64) * 64, 32, 64
    if group % 64:
        return None
    return k, group, next(b for b in (256, 128, 64) if group % b == 0)


def prepare(codes, scales, zero_points, g_idx, spec, defines: dict[str, int] | None = None):
    """The kernel for one weight (see ``slimlm.kernels.quant.prepare_quantized_linear``), or None if unsupported."""
    n, k = codes.shape
    channelwise = spec.group_size == -1
    group = k if channelwise else spec.group_size
    if codes.device.type != "cpu" or k == 0 or n == 0:
        return None
    w8a8 = spec.activations == "int8-token"
    layout = _layout(k, group, channelwise, w8a8)
    if layout is None:
        return None
    kp, gs, qb = layout
    perm = None
    if g_idx is not None:
        perm = _contiguous_groups(g_idx.cpu(), group)
        if perm is None:
            return None
        codes = codes[:, perm]
        perm = None if torch.equal(perm, torch.arange(k)) else perm.to(torch.int32)
    codes = torch.nn.functional.pad(codes.to(torch.int16), (0, kp - k))
    groups = kp // gs
    scales = torch.nn.functional.pad(scales.to(torch.float32), (0, groups - scales.shape[1]))
    zu = None
    if spec.kind == "nf4":
        kind, zu0, stored = KIND_NF4, 0, codes
    elif spec.bits <= 4:
        kind, zu0, stored = KIND_U4, 8, codes + 8
        if zero_points is not None:
            zu = zero_points.to(torch.int32) + 8
    else:
        kind, zu0, stored = KIND_S8, 0, codes
        if zero_points is not None:
            zu = zero_points.to(torch.int32)
    if zu is not None:
        zu = torch.nn.functional.pad(zu, (0, groups - zu.shape[1]))
    if kind == KIND_S8:
        packed = stored.to(torch.int8).view(torch.uint8)
    else:
        stored[:, k:] = 0  # padding meets x's zero padding: any value works, but keep the nibbles clean
        packed = _pack_nibbles(stored.to(torch.uint8))
    mod = load(defines)
    kernel = mod.QLinear(
        packed.contiguous(),
        scales.contiguous(),
        None if zu is None else zu.contiguous(),
        perm,
        kind,
        k,
        kp,
        gs,
        qb,
        zu0,
        w8a8,
        small_max(kind, tiles=False),
    )
    if kernel.tiles_fit:  # the kernel decides: build, OS permission and layout (not group size 32)
        kernel.small_max = small_max(kind, tiles=True)
        kernel.tile_max = tile_max(kind, w8a8)
    return kernel


__all__ = ["available", "load", "prepare"]
