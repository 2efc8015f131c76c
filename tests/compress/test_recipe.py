"""Recipes: composition rules, YAML, the CLI methods' defaults and ignore patterns."""

from __future__ import annotations

import pytest
import yaml

from slimlm.compress.modifiers import AWQModifier, GPTQModifier, NF4Modifier, RTNModifier, SmoothQuantModifier
from slimlm.compress.recipe import Recipe, default_group_size, method_recipe
from slimlm.model.config import ModelConfig
from tests.compress.tiny_models import BASE


def config(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **overrides})


SMOL = config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


def test_yaml_round_trip(tmp_path):
    recipe = Recipe(
        [SmoothQuantModifier(alpha=0.6), GPTQModifier(bits=8, group_size=-1, activations="int8-token")],
        ignore=["lm_head", "re:.*down_proj"],
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    loaded = Recipe.from_yaml(path)
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded.quantizer.scheme.activations == "int8-token"
    assert loaded.required_stats() == {"abs_max", "hessian"}
    assert not loaded.layerwise


def test_llm_compressor_names_and_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "modifiers:\n  - SmoothQuantModifier: {alpha: 0.8}\n  - GPTQModifier:\n      bits: 4\n      group_size: 64\n"
    )
    recipe = Recipe.from_yaml(path)
    assert [m.name for m in recipe.modifiers] == ["smoothquant", "gptq"]
    assert recipe.ignore == ["lm_head"]  # the default when the file names none


@pytest.mark.parametrize(
    "data,message",
    [
        ({"modifiers": [{"gptq": {"bitz": 4}}]}, "gptq has no field 'bitz'"),
        ({"modifiers": [{"gptq": {"bits": 5}}]}, "bits must be 2, 3, 4 or 8"),
        ({"modifiers": [{"gptq": {"dampening_frac": 2.0}}]}, "dampening_frac"),
        ({"modifiers": [{"awq": {"grid": 0}}]}, "grid"),
        ({"modifiers": [{"fp8": {}}]}, "unknown modifier 'fp8'"),
        ({"modifiers": [{"rtn": {}}, {"gptq": {}}]}, "exactly one quantizing modifier"),
        ({"modifiers": [{"smoothquant": {}}]}, "exactly one quantizing modifier"),
        ({"modifiers": [{"rtn": {}}, {"smoothquant": {}}]}, "must come last"),
        ({"modifiers": [{"rtn": {}}], "ignore": "lm_head"}, "'ignore' must be a list"),
        ({"modifiers": [{"rtn": {}}], "stages": {}}, "unknown key"),
        ({"modifiers": [{"rtn": {}}], "ignore": ["re:("]}, "not a valid regex"),
    ],
)
def test_invalid_recipes_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_method_recipes():
    cfg = config()
    assert isinstance(method_recipe("rtn", cfg).quantizer, RTNModifier)
    gptq = method_recipe("gptq", cfg, bits=3, act_order=True).quantizer
    assert gptq.config.act_order and gptq.scheme.bits == 3 and gptq.scheme.group_size == 64  # 128 > 64 columns
    sq = method_recipe("smoothquant", cfg)
    assert [m.name for m in sq.modifiers] == ["smoothquant", "gptq"]
    assert sq.quantizer.scheme.activations == "int8-token" and sq.quantizer.scheme.bits == 8
    assert isinstance(method_recipe("awq", cfg, symmetric=False).quantizer, AWQModifier)
    assert method_recipe("awq", cfg).layerwise
    nf4 = method_recipe("nf4", cfg, double_quant=True).quantizer
    assert isinstance(nf4, NF4Modifier) and nf4.config.double_quant and nf4.scheme.kind == "nf4"
    for method, kwargs, message in [
        ("nf4", dict(bits=8), "nf4 is 4-bit"),
        ("smoothquant", dict(bits=4), "W8A8"),
        ("rtn", dict(act_order=True), "act_order"),
        ("gptq", dict(double_quant=True), "double_quant"),
        ("fp8", {}, "method must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            method_recipe(method, cfg, **kwargs)


def test_default_group_size_fits_the_model():
    assert default_group_size(config(hidden_size=256, intermediate_size=1024), 4) == 128
    assert default_group_size(SMOL, 4) == 64  # 576 = 4.5 x 128
    assert default_group_size(SMOL, 8) == -1
    assert (
        default_group_size(
            config(hidden_size=48, intermediate_size=80, num_attention_heads=3, num_key_value_heads=1), 4
        )
        == -1
    )


def test_ignore_patterns():
    recipe = Recipe([RTNModifier()], ignore=["lm_head", "layers.0.*", "re:layers\\.\\d+\\.mlp\\.down_proj"])
    assert recipe.is_ignored("lm_head")
    assert recipe.is_ignored("layers.0.self_attn.qkv_proj")
    assert recipe.is_ignored("layers.7.mlp.down_proj")
    assert not recipe.is_ignored("layers.7.mlp.gate_up_proj")
    assert not recipe.is_ignored("layers.10.self_attn.o_proj")
