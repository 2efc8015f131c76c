"""NormalFloat-4 (QLoRA, Dettmers et al. 2023): blockwise absmax scaling onto the 16 quantiles of N(0, 1).

Each block of ``block_size`` consecutive input columns of a row keeps its absmax as the scale; weights
divided by it land in [-1, 1] and snap to the nearest :data:`NF4_TABLE` level.

Double quantization compresses those fp32 absmax constants themselves: they are centred on their mean
and quantized to 8 bits in blocks of ``dq_block_size`` (QLoRA uses 256), which takes the scale cost from
32/64 = 0.5 to about 8/64 + 32/(64*256) = 0.127 bits per weight. QLoRA stores them with an 8-bit
*dynamic* (float-like) code; a linear int8 code is used here because centred scales are roughly uniform
over their range, where linear codes are at least as accurate. ``QuantizedWeight`` keeps the
*dequantized* scales, so everything downstream computes with the double-quantization error included, and
the NF4 codes are chosen against those final scales (never worse than keeping the first-pass codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.model.quantized_weight import NF4_TABLE, QuantizedWeight, QuantScheme

__all__ = ["double_quantize_scales", "nf4_codes", "nf4_quantize"]

_MIN_SCALE = 1e-12


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest :data:`NF4_TABLE` level for each value of ``x`` (already scaled to [-1, 1])."""
    table = NF4_TABLE.to(x.device)
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), midpoints)


def double_quantize_scales(scales: torch.Tensor, block_size: int = 256) -> torch.Tensor:
    """``scales`` (any shape, >= 0) after an int8 round trip: mean offset, blocks of ``block_size`` values.

    Blocks run over the flattened (row-major) scales, as QLoRA's do over its flat constant vector.
    """
    if block_size <= 0:
        raise ValueError(f"nf4: dq_block_size must be > 0, not {block_size}")
    flat = scales.float().flatten()
    offset = flat.mean()
    centred = flat - offset
    pad = (-centred.numel()) % block_size
    blocks = F.pad(centred, (0, pad)).view(-1, block_size)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    restored = torch.round(blocks / step).clamp_(-127, 127) * step
    restored = restored.flatten()[: flat.numel()] + offset
    # A rounding step can push a tiny scale through zero; a sign flip would mirror the whole block.
    return restored.clamp_min_(_MIN_SCALE).view_as(scales)


def nf4_quantize(
    weight: torch.Tensor, block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256
) -> QuantizedWeight:
    """``weight [N, K]`` as NF4 codes with one absmax scale per ``block_size`` input columns."""
    scheme = QuantScheme(bits=4, group_size=block_size, symmetric=True, kind="nf4")
    n, k = weight.shape
    g = scheme.num_groups(k)
    w = weight.detach().float().reshape(n, g, k // g)
    absmax = w.abs().amax(dim=-1)
    scales = double_quantize_scales(absmax, dq_block_size) if double_quant else absmax.clamp_min(_MIN_SCALE)
    codes = nf4_codes(w / scales.unsqueeze(-1))
    return QuantizedWeight(scheme=scheme, codes=codes.reshape(n, k).to(torch.int8), scales=scales)
