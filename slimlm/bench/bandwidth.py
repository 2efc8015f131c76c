"""The machine's memory read bandwidth, measured now: the bound that batch-1 decode is judged against."""

from __future__ import annotations

import time

import torch


def read_bandwidth_gbs(size_mb: int = 512, repeats: int = 7) -> float:
    """Best-of-``repeats`` GB/s of a full read of a buffer far larger than the last-level cache.

    ``torch.sum`` over float32 streams the buffer once on all threads; its arithmetic is far below
    the memory bound, so the figure is the read bandwidth a kernel can reach from PyTorch here.
    """
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9
