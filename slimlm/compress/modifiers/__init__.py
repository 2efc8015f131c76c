"""Compression algorithms behind one interface (:class:`Modifier`), looked up by name in recipes."""

from __future__ import annotations

from slimlm.compress.modifiers.awq import AWQConfig, AWQModifier
from slimlm.compress.modifiers.base import LayerContext, Modifier, QuantConfig, QuantizingModifier
from slimlm.compress.modifiers.gptq import GPTQConfig, GPTQModifier
from slimlm.compress.modifiers.nf4 import NF4Config, NF4Modifier
from slimlm.compress.modifiers.rtn import RTNConfig, RTNModifier
from slimlm.compress.modifiers.smoothquant import SmoothQuantConfig, SmoothQuantModifier

__all__ = [
    "MODIFIERS",
    "AWQConfig",
    "AWQModifier",
    "GPTQConfig",
    "GPTQModifier",
    "LayerContext",
    "Modifier",
    "NF4Config",
    "NF4Modifier",
    "QuantConfig",
    "QuantizingModifier",
    "RTNConfig",
    "RTNModifier",
    "SmoothQuantConfig",
    "SmoothQuantModifier",
    "modifier_class",
]

MODIFIERS: dict[str, type[Modifier]] = {
    m.name: m for m in (RTNModifier, GPTQModifier, AWQModifier, SmoothQuantModifier, NF4Modifier)
}


def modifier_class(name: str) -> type[Modifier]:
    """The modifier called ``name``; llm-compressor's class names (``GPTQModifier``) are accepted too."""
    key = name.lower().removesuffix("modifier").replace("-", "").replace("_", "")
    try:
        return MODIFIERS[key]
    except KeyError:
        raise ValueError(f"unknown modifier {name!r}; known: {', '.join(MODIFIERS)}") from None
