"""Training small reference models from scratch (``slimlm train``); see :mod:`slimlm.train.trainer`.

Imports are lazy so that ``import slimlm.train`` stays cheap (no transformers, no tokenizer).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PRESETS", "NextTokenLoss", "Objective", "TrainConfig", "Trainer", "lr_at"]

_MODULE_OF = {
    "PRESETS": "slimlm.train.config",
    "TrainConfig": "slimlm.train.config",
    "NextTokenLoss": "slimlm.train.objectives",
    "Objective": "slimlm.train.objectives",
    "Trainer": "slimlm.train.trainer",
    "lr_at": "slimlm.train.schedule",
}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'slimlm.train' has no attribute {name!r}")
