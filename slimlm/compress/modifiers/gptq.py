"""``gptq``: second-order error compensation from the calibration Hessian (see ``slimlm.compress.gptq``)."""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.compress.gptq import gptq_quantize
from slimlm.compress.modifiers.base import LayerContext, QuantConfig, QuantizingModifier

__all__ = ["GPTQConfig", "GPTQModifier"]


@dataclass
class GPTQConfig(QuantConfig):
    act_order: bool = False  # visit columns by decreasing Hessian diagonal (records g_idx with groups)
    static_groups: bool = False  # with act_order: contiguous groups fixed up front, no g_idx
    block_size: int = 128  # columns per lazy update
    dampening_frac: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size <= 0:
            raise ValueError(f"gptq: block_size must be > 0, not {self.block_size}")
        if not 0 < self.dampening_frac < 1:
            raise ValueError(f"gptq: dampening_frac must be in (0, 1), not {self.dampening_frac}")


class GPTQModifier(QuantizingModifier):
    name = "gptq"
    config_class = GPTQConfig

    def required_stats(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def apply(self, ctx: LayerContext) -> None:
        c = self.config
        for key, linear in ctx.pending():
            ctx.quantized[key] = gptq_quantize(
                linear.weight,
                ctx.stats[key].hessian,
                self.scheme,
                block_size=c.block_size,
                dampening_frac=c.dampening_frac,
                act_order=c.act_order,
                static_groups=c.static_groups,
            )
