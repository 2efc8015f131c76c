"""Resolving the compute dtype: what the user asked for, or the fastest 16-bit type the device runs."""

from __future__ import annotations

import functools
import time

import torch

from slimlm.kernels import REFERENCE_OPS, Ops

_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name; ``None``/"auto" means "choose by measurement"."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in _NAMES.values():
            raise ValueError(f"dtype {value} is not supported; use float32, bfloat16 or float16")
        return value
    if value == "auto":
        return None
    try:
        return _NAMES[value.lower()]
    except KeyError:
        raise ValueError(f"dtype {value!r} is not supported; use auto, float32, bfloat16 or float16") from None


@functools.cache
def fastest_dtype(device_type: str, ops: Ops = REFERENCE_OPS) -> torch.dtype:
    """The dtype whose linears run fastest here, timed through the kernels the engine will use.

    On CUDA: bf16 where supported. On CPU the answer depends on the ISA and the kernels: without
    AVX512-BF16, torch's bf16 GEMM is emulated (slower than fp32), while slimlm's CPU kernel streams
    bf16 weights at half the bytes. Decode (one row) dominates generation, so a dtype wins on its
    one-row time unless its 64-row (prefill) time is more than twice the best.
    """
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type != "cpu":
        return torch.float32
    candidates = (torch.bfloat16, torch.float32)
    decode = {d: _linear_seconds(ops.linear, d, rows=1, size=DECODE_SIZE, matrices=DECODE_MATRICES) for d in candidates}
    prefill = {d: _linear_seconds(ops.linear, d, rows=64, size=PREFILL_SIZE) for d in candidates}
    best_prefill = min(prefill.values())
    usable = [d for d in candidates if prefill[d] <= 2 * best_prefill]
    return min(usable, key=decode.get)


# Decode reads every weight from memory once per token, so its timing cycles through more weights than a
# last-level cache holds (8 x 2048^2 parameters, 64 MiB in bf16). Timed on one matrix in cache, bf16 (converted
# on use) and fp32 came out within noise of each other on a Zen 3 with a 32 MiB L3, and the choice flipped
# from one process to the next. Prefill is compute-bound: one matrix, in cache, is enough.
DECODE_MATRICES, DECODE_SIZE = 8, 2048
PREFILL_SIZE = 1536


def _linear_seconds(linear, dtype: torch.dtype, rows: int, size: int, matrices: int = 1, repeats: int = 5) -> float:
    x = torch.randn(rows, size).to(dtype)
    # Kernel speed does not depend on the values; ones are quicker to make than random weights.
    weights = [torch.ones(size, size, dtype=dtype) for _ in range(matrices)]
    for w in weights:
        linear(x, w, None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            linear(x, w, None)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def resolve_dtype(requested: str | torch.dtype | None, device: torch.device, ops: Ops = REFERENCE_OPS) -> torch.dtype:
    return parse_dtype(requested) or fastest_dtype(device.type, ops)
