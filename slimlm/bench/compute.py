"""The machine's matmul throughput, measured now, and the compute bound it puts on batched decoding.

Batch-1 decode is bound by memory bandwidth; many concurrent sequences are bound by arithmetic: every
prompt and output token costs ~2 FLOPs per weight whatever the batch. So the highest total output
tok/s a concurrent run can reach is GEMM FLOP/s divided by the FLOPs it spends per output token
(prefill included). ``slimlm bench throughput`` prints it next to the measured figure.
"""

from __future__ import annotations

import time

import torch

__all__ = ["matmul_gflops", "concurrent_flops_per_output_token"]


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of a [size, size] x [size, size] matmul in ``dtype`` on all threads."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def concurrent_flops_per_output_token(
    body_params: int, head_params: int, num_layers: int, attn_width: int, input_len: int, output_len: int
) -> float:
    """FLOPs per output token of requests of ``input_len`` in / ``output_len`` out, prefill included.

    Every prompt and output token passes the decoder layers (``body_params`` weights); only output tokens
    pass the LM head (a prefill computes logits for its last position only). Attention adds 4 FLOPs per
    query-key pair per query dimension (scores and weighted values) over a context growing to
    input_len + output_len.
    """
    tokens = input_len + output_len
    linear = 2 * body_params * tokens + 2 * head_params * output_len
    attention = 2 * num_layers * attn_width * tokens * (tokens + 1)
    return (linear + attention) / output_len
