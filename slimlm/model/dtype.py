"""Resolving the compute dtype: what the user asked for, or the fastest 16-bit type the device runs."""

from __future__ import annotations

import functools
import time

import torch

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
def fastest_dtype(device_type: str) -> torch.dtype:
    """The 16-bit dtype with the highest measured matmul throughput on this device type.

    On CUDA bf16 where supported. On CPU the answer depends on the ISA (AVX512-BF16 makes bf16 ~4x
    float32; without native fp16 float16 falls back to a slow path), so time a small GEMM of each.
    """
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type != "cpu":
        return torch.float32
    timings = {dtype: _matmul_seconds(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    return min(timings, key=timings.get)


def _matmul_seconds(dtype: torch.dtype, size: int = 512, repeats: int = 3) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def resolve_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    return parse_dtype(requested) or fastest_dtype(device.type)
