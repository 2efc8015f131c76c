"""Integer quantization primitives shared by every algorithm: group parameters, codes, fake quantization.

Conventions follow :mod:`slimlm.model.quantized_weight` (compressed-tensors' signed codes). Symmetric
scales are ``absmax / ((qmax - qmin) / 2)``, e.g. ``absmax / 7.5`` at 4 bits: the full 16 levels are used
and the one value that would round to +8 is clamped to +7, an error of at most half a step — the same
choice as GPTQ's reference quantizer and compressed-tensors' observers. Asymmetric ranges always include
zero so that exact zeros (padding, dead channels) stay exact.
"""

from __future__ import annotations

import torch

from slimlm.model.quantized_weight import QuantScheme

__all__ = ["compute_qparams", "dequantize_codes", "fake_quantize", "group_size_of", "quantize_codes"]


def group_size_of(scheme: QuantScheme, in_features: int) -> int:
    """Input columns per group (``in_features`` for channel-wise); raises if groups do not tile the row."""
    return in_features // scheme.num_groups(in_features)


def compute_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point for asymmetric schemes) of each group; groups run along the last dim.

    ``w [..., group]`` -> ``(scale [...], zero [...] or None)``, float32; zero points are integers in the
    signed code range, held as floats so callers can do arithmetic on them.
    """
    w = w.float()
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        scale = w.abs().amax(dim=-1) / ((qmax - qmin) / 2)
        return _nonzero(scale), None
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scale = _nonzero((hi - lo) / (qmax - qmin))
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has no range; any positive scale codes it exactly (as 0), and 1 avoids 0/0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes (as float32) of ``w`` given broadcastable ``scale``/``zero``: round to nearest, clamp."""
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero
    return q.clamp_(scheme.qmin, scheme.qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``weight [N, K]`` round-tripped through round-to-nearest quantization (float32, same shape)."""
    n, k = weight.shape
    gs = group_size_of(scheme, k)
    w = weight.float().reshape(n, k // gs, gs)
    scale, zero = compute_qparams(w, scheme)
    scale = scale.unsqueeze(-1)
    zero = None if zero is None else zero.unsqueeze(-1)
    return dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero).reshape(n, k)
