"""Initial weights of a model trained from scratch (a pure function of the seed)."""

from __future__ import annotations

import math

import torch

from slimlm.model.causal_lm import CausalLM

__all__ = ["init_weights"]


def init_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) for embeddings and linear weights, std / sqrt(2 * layers) for the projections
    that write into the residual stream (o_proj, down_proj), zero biases, ones for the norms.

    The values are drawn on the CPU in sorted parameter-name order, so they do not depend on the device
    or on the module's construction order (a resumed run and a fresh one start from the same weights).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = std / math.sqrt(2 * max(1, model.config.num_layers))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(param.shape)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                value = torch.empty(param.shape).normal_(0.0, s, generator=gen)
            param.copy_(value)
