"""NF4 against its definition: nearest level of the block absmax grid; double quantization stays close."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress.modifiers import NF4Modifier
from slimlm.compress.nf4 import double_quantize_scales, nf4_codes, nf4_quantize
from slimlm.compress.recipe import Recipe
from slimlm.model.quantized_weight import NF4_TABLE

HALF_MAX_GAP = float((NF4_TABLE[1:] - NF4_TABLE[:-1]).max()) / 2


def weight(n=64, k=512, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_codes_are_the_nearest_level_of_the_block_absmax():
    w = weight()
    q = nf4_quantize(w, block_size=64)
    assert q.scheme.kind == "nf4" and q.scheme.group_size == 64
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15
    assert torch.equal(q.scales, w.reshape(64, 8, 64).abs().amax(-1))
    scaled = w / q.scales[:, q.group_index()]
    nearest = (scaled.unsqueeze(-1) - NF4_TABLE).abs().argmin(-1)
    assert torch.equal(q.codes.long(), nearest)
    err = (q.dequantize() - w).abs()
    assert bool((err <= HALF_MAX_GAP * q.scales[:, q.group_index()] + 1e-7).all())
    # the absmax of each block is exactly representable (level +-1)
    blocks = w.reshape(64, 8, 64)
    idx = blocks.abs().argmax(-1, keepdim=True)
    assert torch.allclose(q.dequantize().reshape(64, 8, 64).gather(-1, idx), blocks.gather(-1, idx))


def test_nf4_codes_ties_and_extremes():
    assert nf4_codes(torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0])).tolist() == [0, 7, 15, 15, 0]


def test_double_quant_is_close_to_single():
    w = weight()
    single = nf4_quantize(w)
    double = nf4_quantize(w, double_quant=True)
    rel = ((double.scales - single.scales).abs() / single.scales).max()
    assert 0 < float(rel) < 0.02  # 8-bit scales: a small, nonzero error
    e1 = float((single.dequantize() - w).norm())
    e2 = float((double.dequantize() - w).norm())
    assert e2 < 1.05 * e1


def test_double_quantize_scales_blocks():
    s = torch.rand(10, 100) + 0.5
    d = double_quantize_scales(s, block_size=256)
    assert d.shape == s.shape and bool((d > 0).all())
    # per block of 256 flattened values the error is at most half an int8 step of that block's range
    flat, dflat = s.flatten(), d.flatten()
    centred = flat - flat.mean()
    for b in range(0, flat.numel(), 256):
        step = float(centred[b : b + 256].abs().max()) / 127
        assert float((dflat[b : b + 256] - flat[b : b + 256]).abs().max()) <= step / 2 + 1e-6


def test_double_quant_is_recorded_in_the_recipe():
    recipe = Recipe([NF4Modifier(double_quant=True)])
    assert recipe.to_dict()["modifiers"] == [{"nf4": {"block_size": 64, "double_quant": True, "dq_block_size": 256}}]


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="group_size"):
        nf4_quantize(weight(k=96), block_size=64)
    with pytest.raises(ValueError, match="dq_block_size"):
        NF4Modifier(dq_block_size=0)
