"""Shared fixtures: tiny random Hugging Face checkpoints of each supported architecture."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# Overrides that shrink a published shape (new_model) to a test-sized model of the same architecture.
SMALL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)

# name -> (model_type, overrides): together they cover GQA, MQA, MHA, tied/untied embeddings, llama3 rope
# scaling, q/k/v bias, q/k norms, a sliding window shorter than the prompts and head_dim != hidden/heads.
ARCHS = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mqa-llama3rope": (
        "llama",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=7, num_key_value_heads=4, head_dim=24)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("qwen3", dict(head_dim=40, num_key_value_heads=1, tie_word_embeddings=False)),
}


def make_hf_model(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = ARCHS[arch]
    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Larger weights than the default init make logits less flat, so argmax ties cannot hide bugs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """arch name -> directory of a saved tiny random checkpoint (no tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for arch in ARCHS:
        path = root / arch
        make_hf_model(arch).save_pretrained(path)
        paths[arch] = path
    return paths


def tiny_checkpoint(path, *, num_layers: int = 2, dtype: str = "float32", **overrides):
    """A test-sized checkpoint of the smollm2-135m architecture at ``path``, with a small trained tokenizer."""
    from slimlm.data.tokenizer import train_tokenizer
    from slimlm.model.new_model import new_model

    tok = train_tokenizer(["def f(x):\n    return x * 2\n" * 200], vocab_size=300)
    overrides = {**SMALL_SHAPE, "vocab_size": len(tok), **overrides}
    new_model("smollm2-135m", path, num_layers=num_layers, dtype=dtype, tokenizer=tok, overrides=overrides)
    return path
