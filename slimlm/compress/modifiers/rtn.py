"""``rtn``: round-to-nearest quantization, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.compress.modifiers.base import LayerContext, QuantConfig, QuantizingModifier
from slimlm.compress.rtn import rtn_quantize

__all__ = ["RTNConfig", "RTNModifier"]


@dataclass
class RTNConfig(QuantConfig):
    pass


class RTNModifier(QuantizingModifier):
    name = "rtn"
    config_class = RTNConfig

    def apply(self, ctx: LayerContext) -> None:
        scheme = self.scheme
        for key, linear in ctx.pending():
            ctx.quantized[key] = rtn_quantize(linear.weight, scheme)
