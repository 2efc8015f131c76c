"""Folding per-channel scales into the model so that its float function does not change.

A linear's input channel ``j`` divided by ``s_j`` and its weight column ``j`` multiplied by ``s_j`` give
the same product. The division is free when it can be folded into whatever produces that input: the
RMSNorm weight in front of qkv / gate_up, or the rows of the linear that produces it (the value rows of
qkv feed o_proj through attention, which only mixes tokens; the up rows of gate_up feed down_proj through
``silu(gate) * up``, which is linear in ``up``).
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.model.layers import RMSNorm

__all__ = ["fold_into_norm", "fold_into_rows", "scale_columns"]


@torch.no_grad()
def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight)[None, :])


@torch.no_grad()
def fold_into_norm(norm: RMSNorm, linear: nn.Linear, s: torch.Tensor) -> None:
    """``linear(norm(x))`` unchanged; ``norm``'s output (``linear``'s input) becomes ``x / s``."""
    norm.weight.div_(s.to(norm.weight))
    scale_columns(linear, s)


@torch.no_grad()
def fold_into_rows(producer: nn.Linear, rows: slice, consumer: nn.Linear, s_rows: torch.Tensor, s_cols: torch.Tensor):
    """Output rows ``rows`` of ``producer`` divided by ``s_rows``; ``consumer``'s columns multiplied by ``s_cols``
    (``s_rows`` expanded to the consumer's input channels)."""
    producer.weight[rows].div_(s_rows.to(producer.weight)[:, None])
    if producer.bias is not None:
        producer.bias[rows].div_(s_rows.to(producer.bias))
    scale_columns(consumer, s_cols)
