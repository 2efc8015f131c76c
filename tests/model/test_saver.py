"""save_pretrained: our CausalLM written as a Hugging Face directory that transformers and load_model read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimlm.kernels import REFERENCE_OPS
from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.model.loader import load_config, load_model
from slimlm.model.saver import hf_config_dict, save_pretrained
from slimlm.train.weight_init import init_weights
from tests.conftest import ARCHS

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "untied-llama3rope": dict(
        tie_word_embeddings=False,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "linear-rope-headdim": dict(tie_word_embeddings=True, head_dim=24, rope_scaling={"type": "linear", "factor": 2.0}),
}


def random_model(variant: str, seed: int = 0) -> CausalLM:
    config = ModelConfig.from_dict({**BASE, **VARIANTS[variant]})
    model = CausalLM(config, REFERENCE_OPS)
    init_weights(model, seed, std=0.1)  # larger than 0.02 so that the logits are far from flat
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones, so a norm mixed up with another shows
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_reads_identical_logits(tmp_path, variant):
    model = random_model(variant)
    out = save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model.forward_dense(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ref.config.tie_word_embeddings == model.config.tie_word_embeddings


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_model_reads_identical_parameters(tmp_path, variant):
    model = random_model(variant)
    out = save_pretrained(model, tmp_path / "m", dtype=torch.float32)
    assert load_config(out) == dataclasses.replace(model.config, torch_dtype="float32")
    loaded = load_model(out, dtype="float32", kernels="torch", load_tokenizer_files=False).model
    ours, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name


def test_file_layout_tied_and_bf16(tmp_path):
    model = random_model("tied")
    out = save_pretrained(model, tmp_path / "m")  # default dtype: bfloat16
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.1.mlp.up_proj.weight"].shape == (96, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    q = model.layers[0].self_attn.qkv_proj.weight[:64]
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], q.to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16" and cfg["rope_parameters"]["rope_type"] == "default"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1
    loaded = load_model(out, dtype="float32", kernels="torch", load_tokenizer_files=False).model
    torch.testing.assert_close(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16).float())


def test_tokenizer_and_extra_config(tmp_path):
    from slimlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=280)
    model = random_model("tied")
    out = save_pretrained(
        model, tmp_path / "m", tokenizer=tok, extra_config={"slimlm": {"note": "x"}}, dtype=torch.float32
    )
    loaded = load_model(out, dtype="float32", kernels="torch")
    assert loaded.tokenizer("def")["input_ids"] == tok("def")["input_ids"]
    assert json.loads((out / "config.json").read_text())["slimlm"] == {"note": "x"}


def test_atomic_and_overwrite(tmp_path):
    model = random_model("tied")
    out = tmp_path / "m"
    save_pretrained(model, out)
    with pytest.raises(FileExistsError):
        save_pretrained(model, out, overwrite=False)
    save_pretrained(random_model("tied", seed=1), out)  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_dict_round_trips(hf_checkpoints, arch):
    config = load_config(hf_checkpoints[arch])
    again = ModelConfig.from_dict(hf_config_dict(config))
    assert again == config


def test_config_dict_refuses_what_llama_cannot_express():
    config = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]})  # q/k/v bias, no o bias
    with pytest.raises(ValueError, match="attention_bias"):
        hf_config_dict(dataclasses.replace(config, architecture="LlamaForCausalLM"))
