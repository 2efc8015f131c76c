"""The sequential pipeline on a tiny random model: what it quantizes, how close it stays, what it holds."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from slimlm.compress.modifiers import GPTQModifier, RTNModifier
from slimlm.compress.pipeline import PipelineOptions, check_recipe, compress_model
from slimlm.compress.recipe import Recipe, method_recipe
from slimlm.model.quantized_linear import QuantizedLinear
from tests.compress.tiny_models import calib_ids, rel_error, tiny_model
from tests.model.test_parity import paged_logits

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    # The numbers below are the algorithms' own: run quantized linears with the reference semantics, not
    # a CPU kernel's faster approximation.
    monkeypatch.setenv("SLIMLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def ids(base):
    return calib_ids(base, sequences=8, length=32)


def compressed(base, recipe, ids, **options):
    model = copy.deepcopy(base)
    result = compress_model(model, recipe, ids, PipelineOptions(progress=False, chunk_tokens=64, **options))
    return model, result


@torch.no_grad()
@pytest.mark.parametrize(
    "method,fields,tolerance",
    [
        ("rtn", dict(bits=8), 0.03),
        ("gptq", dict(bits=8), 0.03),
        ("smoothquant", {}, 0.05),
        ("gptq", dict(bits=4, group_size=32, act_order=True), 0.3),
        ("awq", dict(bits=4, group_size=32), 0.3),
        ("nf4", dict(double_quant=True), 0.3),
    ],
)
def test_quantizes_every_decoder_linear_and_stays_close(base, ids, method, fields, tolerance):
    model, result = compressed(base, method_recipe(method, base.config, **fields), ids)
    for layer in model.layers:
        for key in LINEARS:
            assert isinstance(layer.get_submodule(key), QuantizedLinear), key
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert len(result.quantized) == 4 * base.config.num_layers
    assert rel_error(model.forward_dense(ids), base.forward_dense(ids)) < tolerance


@torch.no_grad()
def test_gptq_beats_rtn_end_to_end(base, ids):
    errors = {}
    for method in ("rtn", "gptq"):
        model, _ = compressed(base, method_recipe(method, base.config, bits=4, group_size=32), ids)
        errors[method] = rel_error(model.forward_dense(ids), base.forward_dense(ids))
    assert errors["gptq"] < 0.95 * errors["rtn"]


@torch.no_grad()
def test_schedules(base, ids):
    _, result = compressed(base, method_recipe("gptq", base.config, bits=4, group_size=32), ids)
    assert result.schedule == "stage-wise" and result.calibration_tokens == ids.numel()
    _, result = compressed(base, method_recipe("awq", base.config, bits=4, group_size=32), ids)
    assert result.schedule == "layer-wise"
    alphas = [m["alpha"] for m in result.metrics if m["modifier"] == "awq"]
    assert len(alphas) == 4 * base.config.num_layers
    model, result = compressed(base, method_recipe("rtn", base.config, bits=4, group_size=32), None)
    assert result.schedule == "weights-only" and result.calibration_tokens == 0
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)


@torch.no_grad()
def test_engine_sees_the_new_linears(base, ids):
    model, _ = compressed(base, method_recipe("gptq", base.config, bits=4, group_size=32), ids)
    tokens = ids[0, :12].tolist()
    dense = model.compute_logits(model.norm(_hidden(model, tokens)))
    assert torch.allclose(paged_logits(model, tokens, [5, 4, 1, 1, 1]), dense, atol=1e-3, rtol=1e-3)
    float_logits = base.forward_dense(torch.tensor([tokens]))[0]
    assert not torch.allclose(dense, float_logits, atol=1e-3)


def _hidden(model, tokens):
    x = model.embed_tokens(torch.tensor([tokens]))
    positions = torch.arange(len(tokens)).unsqueeze(0)
    for layer in model.layers:
        x = layer.forward_dense(x, positions, model.cos_sin)
    return x[0]


@torch.no_grad()
def test_ignore_patterns_and_lm_head(base, ids):
    recipe = Recipe([GPTQModifier(bits=4, group_size=32)], ignore=["layers.1.*", "re:.*\\.0\\.mlp\\.down_proj"])
    model, result = compressed(base, recipe, ids)
    assert isinstance(model.lm_head, QuantizedLinear)  # no longer ignored: the final norm's output calibrates it
    assert all(isinstance(model.layers[1].get_submodule(k), nn.Linear) for k in LINEARS)
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert len(result.quantized) == 4 * 3 - 4 - 1 + 1
    tied = tiny_model(tie_word_embeddings=True)
    model, result = compressed(tied, Recipe([RTNModifier(bits=8, group_size=-1)], ignore=[]), None)
    assert model.lm_head is None and "lm_head" not in result.quantized


def _live_activations(batch: int, length: int) -> int:
    """Float tensors shaped like a whole calibration batch's activations ``[batch, length, *]``."""
    count = 0
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.dim() == 3 and tuple(obj.shape[:2]) == (batch, length):
            count += obj.is_floating_point()
    return count


@torch.no_grad()
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_holds_one_layers_activations_at_a_time(method, ids):
    model = tiny_model(num_hidden_layers=5)
    b, length = ids.shape
    seen: list[int] = []
    recipe = method_recipe(method, model.config, bits=4, group_size=32)

    def on_stage(layer: int, stage: str) -> None:
        seen.append(_live_activations(b, length))

    compress_model(model, recipe, ids, PipelineOptions(progress=False, chunk_tokens=64, on_stage=on_stage))
    assert len(seen) == (4 * 5 if method == "gptq" else 5)
    # the hidden states plus at most one intermediate buffer, however many layers: never all layers' activations
    assert 1 <= max(seen) <= 2


def test_rejects_a_group_size_that_does_not_tile(base, ids):
    recipe = Recipe([GPTQModifier(bits=4, group_size=128)])
    with pytest.raises(ValueError, match="group_size 128 does not divide the 64 input features of layers.0"):
        check_recipe(base, recipe)
    with pytest.raises(ValueError, match="calibration"):
        compress_model(copy.deepcopy(base), Recipe([GPTQModifier(bits=4, group_size=32)]), None)
