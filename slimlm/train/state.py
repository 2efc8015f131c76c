"""A run's progress over all its resumed parts, and the log records made from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Saved in and restored from the checkpoint (:mod:`slimlm.train.checkpoint`)."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # optimizer steps only
    wall_seconds: float = 0.0  # fit() wall time, evaluations and checkpoints included, over all runs
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def train_record(self, *, loss: float, lr: float, grad_norm: float, tokens_per_second: float) -> dict[str, Any]:
        return {
            "event": "train",
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
            "tokens_seen": self.tokens_seen,
        }

    def add_evaluation(self, result: dict[str, float], train_loss: float | None) -> dict[str, Any]:
        """Appends a validation ``result`` (:func:`~slimlm.train.evaluate.evaluate_perplexity`) to the history."""
        record = {
            "event": "eval",
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "val_loss": result["loss"],
            "val_ppl": result["ppl"],
            "val_tokens": result["tokens"],
            "train_loss": train_loss,
        }
        self.history.append(record)
        return record
