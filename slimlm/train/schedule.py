"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so step 0 does not
    waste its gradient on a zero rate and step ``warmup_steps - 1`` runs at ``lr``). Then a half cosine
    from ``lr`` at step ``warmup_steps`` to ``min_lr`` at step ``total_steps``; ``min_lr`` afterwards.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
