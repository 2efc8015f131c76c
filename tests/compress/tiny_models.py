"""Test models and inputs for the compression tests (small enough to calibrate in well under a second)."""

from __future__ import annotations

import torch

from slimlm.compress.modifiers.base import LAYER_KEYS, LayerContext
from slimlm.compress.stats import StatsAccumulator
from slimlm.kernels import REFERENCE_OPS
from slimlm.model.causal_lm import CausalLM
from slimlm.model.config import ModelConfig
from slimlm.train.weight_init import init_weights

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    """A random Llama (GQA, untied lm_head) with non-trivial norms and a few outlier input channels, like
    trained models have (they are what AWQ and SmoothQuant exist for)."""
    config = ModelConfig.from_dict({**BASE, **overrides})
    model = CausalLM(config, REFERENCE_OPS)
    init_weights(model, seed, std=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
                p[:3] *= 8.0  # outlier channels
    return model.eval()


def calib_ids(model: CausalLM, sequences: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (sequences, length), generator=gen)


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are correlated and of unequal size (as real activations are)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=gen) * 2 + 0.1
    return (torch.randn(tokens, k, generator=gen) @ mix) * scale


def outlier_inputs(tokens: int, k: int, outliers: int = 4, factor: float = 30.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:outliers]] *= factor
    return x


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def float_layer_context(model: CausalLM, ids: torch.Tensor, index: int, kinds: frozenset[str], samples: int = 4):
    """The LayerContext of layer ``index`` with statistics gathered from the float model's forward."""
    layer = model.layers[index]
    accs = {k: StatsAccumulator(layer.get_submodule(k).in_features, kinds, samples, ids.device) for k in LAYER_KEYS}
    handles = [
        layer.get_submodule(k).register_forward_pre_hook(lambda _m, args, k=k: accs[k].add(args[0], 0))
        for k in LAYER_KEYS
    ]
    try:
        model.forward_dense(ids)
    finally:
        for h in handles:
            h.remove()
    return LayerContext(
        index=index,
        layer=layer,
        config=model.config,
        targets={k: layer.get_submodule(k) for k in LAYER_KEYS},
        stats={k: a.result() for k, a in accs.items()},
        cos_sin=model.cos_sin,
    )
