"""Compressing models: quantization algorithms, recipes, the sequential calibration pipeline, ``slimlm compress``.

Layout: the maths as pure functions, one algorithm per module (``rtn``, ``gptq``, ``awq``,
``smoothquant``, ``nf4``, on top of ``quantize``); ``modifiers/`` wraps each in the one
:class:`~slimlm.compress.modifiers.Modifier` interface; ``recipe`` composes modifiers; ``pipeline`` runs
a recipe layer by layer over calibration data from ``calibration``; ``run`` and ``cli`` load, compress
and write a checkpoint (with ``checkpoint.save_compressed``).

Imports are lazy so that ``import slimlm.compress`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "CalibrationConfig": "slimlm.compress.calibration",
    "PipelineOptions": "slimlm.compress.pipeline",
    "Recipe": "slimlm.compress.recipe",
    "compress_checkpoint": "slimlm.compress.run",
    "compress_model": "slimlm.compress.pipeline",
    "gptq_quantize": "slimlm.compress.gptq",
    "method_recipe": "slimlm.compress.recipe",
    "nf4_quantize": "slimlm.compress.nf4",
    "rtn_quantize": "slimlm.compress.rtn",
    "smoothing_factors": "slimlm.compress.smoothquant",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
