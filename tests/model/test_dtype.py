"""The default dtype: the one whose linears a decode step runs fastest, unless its prefill is far slower."""

from __future__ import annotations

import dataclasses
import time

import torch

from slimlm.kernels import REFERENCE_OPS
from slimlm.model.dtype import DECODE_MATRICES, DECODE_SIZE, fastest_dtype


def timed_ops(seconds):
    """Ops whose linear takes ``seconds(rows, dtype)`` and records which weights it read."""
    seen = {}

    def linear(x, weight, bias):
        seen.setdefault((x.shape[0], weight.dtype), set()).add(weight.data_ptr())
        deadline = time.perf_counter() + seconds(x.shape[0], weight.dtype)
        while time.perf_counter() < deadline:
            pass
        return x.new_zeros(x.shape[0], weight.shape[0])

    return dataclasses.replace(REFERENCE_OPS, name="timed", linear=linear), seen


def test_decode_bound_by_bytes_picks_bf16_and_times_more_weights_than_a_cache_holds():
    ops, seen = timed_ops(lambda rows, dtype: 1e-4 * (2 if dtype == torch.float32 else 1))
    assert fastest_dtype("cpu", ops) == torch.bfloat16
    assert len(seen[(1, torch.bfloat16)]) == DECODE_MATRICES == len(seen[(1, torch.float32)])
    assert DECODE_MATRICES * DECODE_SIZE**2 * 2 > 32 * 2**20  # bf16 bytes per timed pass: more than a 32 MiB L3
    assert len(seen[(64, torch.bfloat16)]) == 1


def test_bf16_is_refused_where_its_prefill_is_emulated():
    # Faster decode in bf16, but a prefill 3x slower than fp32 (torch's bf16 GEMM without AVX512-BF16).
    ops, _ = timed_ops(lambda rows, dtype: 1e-4 * (3 if rows > 1 and dtype == torch.bfloat16 else 1))
    assert fastest_dtype("cpu", ops) == torch.float32


def test_devices_other_than_cpu_and_cuda_take_float32():
    assert fastest_dtype("meta") == torch.float32
