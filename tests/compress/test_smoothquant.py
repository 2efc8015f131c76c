"""SmoothQuant: folding keeps the float function; it lowers the W8A8 error on outlier channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.compress.folding import fold_into_norm
from slimlm.compress.modifiers import SmoothQuantModifier
from slimlm.compress.modifiers.base import GATE_UP, QKV
from slimlm.compress.rtn import rtn_quantize
from slimlm.compress.smoothquant import smoothing_factors
from slimlm.model.layers import RMSNorm
from slimlm.model.quantized_linear import QuantizedLinear
from slimlm.model.quantized_weight import QuantScheme
from tests.compress.tiny_models import calib_ids, float_layer_context, outlier_inputs, rel_error, tiny_model

W8A8 = QuantScheme(bits=8, group_size=-1, activations="int8-token")


def w8a8(linear: nn.Linear) -> QuantizedLinear:
    return QuantizedLinear(rtn_quantize(linear.weight, W8A8), linear.bias, torch.float32)


@torch.no_grad()
def test_smoothing_keeps_float_outputs_and_lowers_w8a8_error():
    torch.manual_seed(0)
    k = 128
    x = outlier_inputs(512, k, outliers=4, factor=50.0)
    norm, linear = RMSNorm(k, 1e-5), nn.Linear(k, 96)
    ref = linear(norm(x))
    plain = rel_error(w8a8(linear)(norm(x)), ref)

    s = smoothing_factors(norm(x).abs().amax(0), [linear.weight], alpha=0.5)
    fold_into_norm(norm, linear, s)
    assert torch.allclose(linear(norm(x)), ref, rtol=1e-4, atol=1e-5)
    smoothed = rel_error(w8a8(linear)(norm(x)), ref)
    assert smoothed < 0.5 * plain


def test_factors_balance_the_maxima():
    act = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[0.01, 1.0, 0.25]])
    s = smoothing_factors(act, [w], alpha=0.5)
    assert torch.allclose(act / s, w.abs().amax(0) * s)  # alpha = 0.5: both sides meet at sqrt(a * w)
    assert torch.allclose(smoothing_factors(act, [w], alpha=0.0), 1 / w.abs().amax(0))
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(act, [w], alpha=1.5)


@torch.no_grad()
def test_modifier_folds_into_both_norms_without_changing_the_model():
    model = tiny_model()
    ids = calib_ids(model)
    ref = model.forward_dense(ids)
    norms = (model.layers[1].input_layernorm.weight.clone(), model.layers[1].post_attention_layernorm.weight.clone())
    ctx = float_layer_context(model, ids, 1, frozenset({"abs_max", "hessian"}))
    hessian_before = ctx.stats[QKV].hessian.clone()
    SmoothQuantModifier(alpha=0.5, smooth_down=True).apply(ctx)
    assert torch.allclose(model.forward_dense(ids), ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.layers[1].input_layernorm.weight, norms[0])
    assert not torch.equal(model.layers[1].post_attention_layernorm.weight, norms[1])
    # the statistics follow the fold (later modifiers see the smoothed inputs)
    s = norms[0] / model.layers[1].input_layernorm.weight
    assert torch.allclose(ctx.stats[QKV].hessian, hessian_before / (s[:, None] * s[None, :]), rtol=1e-4)
    assert {m["linear"] for m in ctx.metrics} >= {"layers.1." + QKV, "layers.1." + GATE_UP}
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantModifier(alpha=-0.1)
