"""The resumable state of a run: ``checkpoint.pt`` and the checks before resuming from it.

The file is a ``torch.save`` of plain tensors and containers (model, optimizer, progress, torch RNG), so
it loads with ``weights_only=True``. Together with batches that depend only on (seed, step), restoring
it makes a resumed run follow the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.train.config import TrainConfig
from slimlm.train.data import tokenizer_fingerprint
from slimlm.train.run_output import atomic_write
from slimlm.train.state import TrainState

__all__ = [
    "CHECKPOINT_NAME",
    "check_resumable",
    "load_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_VERSION = 1


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(config: TrainConfig, checkpoint: dict[str, Any]) -> None:
    """Refuses to resume with settings that change what is computed (all but ``TrainConfig.RUN_FIELDS``)."""
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    different = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in TrainConfig.RUN_FIELDS and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if different:
        detail = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(config, n)!r}" for n in different)
        raise ValueError(
            f"cannot resume {config.out_dir}: the checkpoint was trained with other settings ({detail}); "
            f"use the same settings or another out_dir"
        )
    if saved.total_steps != config.total_steps:
        logger.warning(
            "resuming with %d total steps instead of %d: the learning-rate schedule changes from here",
            config.total_steps,
            saved.total_steps,
        )


def save_checkpoint(
    path: Path,
    *,
    config: TrainConfig,
    objective_name: str,
    tokenizer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    wall_seconds: float,
) -> Path:
    """Writes the checkpoint atomically; ``wall_seconds`` is the run's wall time including this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": _CHECKPOINT_VERSION,
        "train_config": config.to_dict(),
        "objective": objective_name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds,
        "total_steps": state.total_steps,
        "history": state.history,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
    return path


def restore_checkpoint(
    checkpoint: dict[str, Any],
    path: Path,
    *,
    config: TrainConfig,
    objective_name: str,
    tokenizer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> TrainState:
    """Loads the weights, optimizer and torch RNG of ``checkpoint`` (read from ``path``); returns its progress."""
    if checkpoint.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {checkpoint.get('version')}")
    if checkpoint.get("objective") != objective_name:
        raise ValueError(
            f"the checkpoint was trained with objective {checkpoint.get('objective')!r}, not {objective_name!r}"
        )
    if checkpoint.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise ValueError("the checkpoint was trained with another tokenizer")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    total_steps = int(checkpoint["total_steps"])  # may have been shortened by fit_to_time_limit
    if TrainConfig.from_dict(checkpoint["train_config"]).total_steps != config.total_steps:
        total_steps = config.total_steps  # a new budget (see check_resumable)
    elif int(checkpoint["step"]) >= total_steps and config.fit_to_time_limit and config.total_steps > total_steps:
        # A finished, time-fitted run resumed for more time: the budget is the config's again, and the
        # fit cuts it to the new time limit (the cosine stretches from where the run stands).
        total_steps = config.total_steps
    state = TrainState(
        step=int(checkpoint["step"]),
        tokens_seen=int(checkpoint["tokens_seen"]),
        train_seconds=float(checkpoint["train_seconds"]),
        wall_seconds=float(checkpoint.get("wall_seconds", 0.0)),
        total_steps=total_steps,
        history=list(checkpoint["history"]),
    )
    torch.set_rng_state(checkpoint["torch_rng"])
    return state
