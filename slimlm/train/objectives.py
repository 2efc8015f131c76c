"""What a :class:`~slimlm.train.trainer.Trainer` minimises: the :class:`Objective` protocol and its objectives.

Only next-token cross-entropy (:class:`NextTokenLoss`) exists now; distillation of a draft from a target's
logits, or Medusa heads on a frozen target, are further objectives (the target lives in the objective,
the trained module is ``model``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.train.data import Batch

__all__ = ["NextTokenLoss", "Objective"]


@runtime_checkable
class Objective(Protocol):
    """What a :class:`~slimlm.train.trainer.Trainer` minimises.

    ``parameters(model)``: the (name, parameter) pairs to train; anything else stays frozen (a Medusa
    objective returns only its heads). ``loss(model, batch)``: a scalar to minimise, mean over the
    batch's predicted tokens. A distillation objective keeps its (frozen) target model itself.
    ``name`` is stored in checkpoints, so that a run is never resumed with another objective.
    """

    name: str

    def parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]: ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


class NextTokenLoss:
    """Mean next-token cross-entropy of ``model.forward_dense`` (the usual language-model loss)."""

    name = "next-token-ce"

    def parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model.forward_dense(batch.input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten())
