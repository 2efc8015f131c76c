"""The optimizer of a training run: AdamW, with weight decay on matrices only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimlm.train.config import TrainConfig

__all__ = ["make_optimizer"]


def make_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]], config: TrainConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """AdamW over ``named_parameters``; returns it and the trained parameters (for gradient clipping)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        # Decay would pull norm gains towards 0 and biases carry no capacity to regularise: the GPT recipe.
        (no_decay if param.dim() < 2 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for all parameters instead of several per tensor
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, **kwargs)
    return optimizer, decay + no_decay
