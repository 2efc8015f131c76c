"""AWQ: scale folding keeps the float model; the search and clipping lower the quantized error."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress.awq import awq_clip_search, awq_scales, awq_search_scales, clip_weight
from slimlm.compress.folding import fold_into_norm, fold_into_rows
from slimlm.compress.modifiers import AWQModifier
from slimlm.compress.modifiers.base import DOWN, GATE_UP, QKV, O
from slimlm.compress.quantize import fake_quantize
from slimlm.model.quantized_weight import QuantScheme
from tests.compress.tiny_models import calib_ids, float_layer_context, outlier_inputs, rel_error, tiny_model

SCHEME = QuantScheme(bits=4, group_size=32)


def test_scales_are_normalised_powers_of_the_activation_means():
    x_mean = torch.tensor([4.0, 1.0, 0.25])
    assert torch.allclose(awq_scales(x_mean, 0.0), torch.ones(3))
    s = awq_scales(x_mean, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 0.5]))  # sqrt(max * min) = 1


def test_search_beats_rtn_on_outlier_channels():
    k, n = 128, 64
    x = outlier_inputs(1024, k, outliers=4, factor=20.0)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    ref = x @ w.T

    def loss(w_eff):
        return float(((x @ w_eff.T - ref) ** 2).mean())

    result = awq_search_scales(w, x.abs().mean(0), loss, SCHEME, grid=20)
    assert result.alpha > 0
    assert result.loss < 0.7 * result.rtn_loss
    assert result.rtn_loss == pytest.approx(loss(fake_quantize(w, SCHEME)))
    duo = awq_search_scales(w, x.abs().mean(0), loss, SCHEME, grid=20, duo_scaling=True)
    assert duo.loss < duo.rtn_loss


def test_clipping_never_increases_the_per_group_error():
    k, n = 128, 32
    x = torch.randn(512, k, generator=torch.Generator().manual_seed(4))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 0.05
    w[:, 5] *= 6  # a few large weights widen their groups' range
    max_val = awq_clip_search(w, x, SCHEME, grid=20, max_shrink=0.5)
    absmax = w.reshape(n, 4, 32).abs().amax(-1)
    assert bool((max_val <= absmax + 1e-7).all()) and bool((max_val >= 0.5 * absmax - 1e-7).all())
    clipped = clip_weight(w, max_val)
    ref = x @ w.T
    assert rel_error(x @ fake_quantize(clipped, SCHEME).T, ref) <= rel_error(x @ fake_quantize(w, SCHEME).T, ref)


@torch.no_grad()
def test_folding_every_mapping_keeps_the_float_model():
    model = tiny_model()
    ids = calib_ids(model)
    ref = model.forward_dense(ids)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold_into_norm(layer.input_layernorm, attn.qkv_proj, torch.rand(cfg.hidden_size, generator=gen) + 0.5)
        s_kv = torch.rand(cfg.kv_size, generator=gen) + 0.5
        group = cfg.num_heads // cfg.num_kv_heads
        s_o = s_kv.view(cfg.num_kv_heads, 1, cfg.head_dim).expand(-1, group, -1).reshape(-1)
        v_rows = slice(cfg.q_size + cfg.kv_size, None)
        fold_into_rows(attn.qkv_proj, v_rows, attn.o_proj, s_kv, s_o)
        s = torch.rand(cfg.hidden_size, generator=gen) + 0.5
        fold_into_norm(layer.post_attention_layernorm, mlp.gate_up_proj, s)
        s = torch.rand(cfg.intermediate_size, generator=gen) + 0.5
        fold_into_rows(mlp.gate_up_proj, slice(cfg.intermediate_size, None), mlp.down_proj, s, s)
    assert torch.allclose(model.forward_dense(ids), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_modifier_scaling_keeps_the_float_model_and_lowers_the_quantized_error():
    model = tiny_model()
    ids = calib_ids(model)
    ref = model.forward_dense(ids)
    modifier = AWQModifier(bits=4, group_size=32, clip=False)
    rtn_model, awq_model = tiny_model(), tiny_model()
    ratios = []
    for i in range(model.config.num_layers):
        ctx = float_layer_context(model, ids, i, modifier.required_stats())
        modifier.scale(ctx)
        assert {m["linear"] for m in ctx.metrics} == {f"layers.{i}.{k}" for k in (QKV, O, GATE_UP, DOWN)}
        ratios += [m["loss"] / m["rtn_loss"] for m in ctx.metrics]
    assert max(ratios) <= 1.0 and sum(ratios) / len(ratios) < 0.85  # each block's output error, vs RTN
    assert torch.allclose(model.forward_dense(ids), ref, rtol=1e-4, atol=1e-4)
    # quantize the scaled weights and the original ones the same way (RTN): AWQ's scales must help
    for src, dst in ((model, awq_model), (rtn_model, rtn_model)):
        for s_layer, d_layer in zip(src.layers, dst.layers, strict=True):
            for key in (QKV, O, GATE_UP, DOWN):
                w = fake_quantize(s_layer.get_submodule(key).weight, modifier.scheme)
                d_layer.get_submodule(key).weight.copy_(w)
            d_layer.input_layernorm.weight.copy_(s_layer.input_layernorm.weight)
            d_layer.post_attention_layernorm.weight.copy_(s_layer.post_attention_layernorm.weight)
    assert rel_error(awq_model.forward_dense(ids), ref) < 0.95 * rel_error(rtn_model.forward_dense(ids), ref)


@pytest.mark.parametrize("tokens", [64, 4096])  # the direct product, then the Gram matrix
def test_linear_loss_equals_the_output_error_of_the_linear(tokens):
    from slimlm.compress.modifiers.awq import _block_loss, _linear_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 96, generator=gen) * torch.linspace(0.1, 3.0, 96)
    w = torch.randn(48, 96, generator=gen)
    w_eff = w + 0.01 * torch.randn(48, 96, generator=gen)
    expected = _block_loss(lambda v: torch.nn.functional.linear(x, v), w)(w_eff)
    assert _linear_loss(x.view(-1, tokens // 16 if tokens > 64 else 4, 96), w, 21)(w_eff) == pytest.approx(
        expected, rel=1e-4
    )
    assert _linear_loss(x, w, 21)(w) == pytest.approx(0.0, abs=1e-9)
