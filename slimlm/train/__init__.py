"""Training small reference models from scratch (``slimlm train``); see :mod:`slimlm.train.trainer`.

Imports are lazy so that ``import slimlm.train`` stays cheap (no transformers, no tokenizer).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "NextTokenLoss", "Objective", "TrainConfig", "Trainer", "lr_at"]


def __getattr__(name: str) -> Any:
    if name == "lr_at":
        from slimlm.train.schedule import lr_at

        return lr_at
    if name in __all__:
        from slimlm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'slimlm.train' has no attribute {name!r}")
