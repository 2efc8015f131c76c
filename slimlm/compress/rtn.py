"""Round-to-nearest (RTN) quantization: each group's scale from its own range, every weight rounded alone.

The baseline every other algorithm is measured against; it needs no calibration data.
"""

from __future__ import annotations

import torch

from slimlm.compress.quantize import compute_qparams, group_size_of, quantize_codes
from slimlm.model.quantized_weight import QuantizedWeight, QuantScheme

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """``weight [N, K]`` quantized per group of ``scheme.group_size`` input columns (integer schemes)."""
    if scheme.kind != "int":
        raise ValueError(f"rtn: scheme kind must be 'int', not {scheme.kind!r} (nf4 has its own quantizer)")
    n, k = weight.shape
    gs = group_size_of(scheme, k)
    w = weight.detach().float().reshape(n, k // gs, gs)
    scale, zero = compute_qparams(w, scheme)
    codes = quantize_codes(w, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), scheme)
    return QuantizedWeight(
        scheme=scheme,
        codes=codes.reshape(n, k).to(torch.int8),
        scales=scale,
        zero_points=None if zero is None else zero.to(torch.int8),
    )
