"""``nf4``: QLoRA's NormalFloat-4 with blockwise absmax scales, optionally double-quantized."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.compress.modifiers.base import LayerContext, QuantizingModifier
from slimlm.compress.nf4 import nf4_quantize
from slimlm.model.quantized_weight import QuantScheme

__all__ = ["NF4Config", "NF4Modifier"]


@dataclass
class NF4Config:
    block_size: int = 64  # input columns per absmax scale
    double_quant: bool = False  # scales themselves quantized to 8 bits (their error is kept in the weights)
    dq_block_size: int = 256  # scales per second-level block

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"nf4: block_size must be > 0, not {self.block_size}")
        if self.dq_block_size <= 0:
            raise ValueError(f"nf4: dq_block_size must be > 0, not {self.dq_block_size}")


class NF4Modifier(QuantizingModifier):
    name = "nf4"
    config_class = NF4Config

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=4, group_size=self.config.block_size, symmetric=True, kind="nf4")

    def apply(self, ctx: LayerContext) -> None:
        c = self.config
        for key, linear in ctx.pending():
            ctx.quantized[key] = nf4_quantize(linear.weight, c.block_size, c.double_quant, c.dq_block_size)
