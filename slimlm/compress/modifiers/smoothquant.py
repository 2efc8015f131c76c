"""``smoothquant``: migrate activation outliers into the weights ahead of W8A8 (see ``slimlm.compress.smoothquant``).

It only rewrites weights; a quantizing modifier after it (``rtn`` or ``gptq`` with ``activations:
int8-token``) produces the int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimlm.compress.folding import fold_into_norm, fold_into_rows
from slimlm.compress.modifiers.base import DOWN, GATE_UP, QKV, LayerContext, Modifier
from slimlm.compress.smoothquant import smoothing_factors

__all__ = ["SmoothQuantConfig", "SmoothQuantModifier"]


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 leaves activations alone, 1 moves all their range to weights
    smooth_down: bool = False  # also smooth down_proj's inputs, folding the factors into gate_up's up rows

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha must be in [0, 1], not {self.alpha}")


class SmoothQuantModifier(Modifier):
    name = "smoothquant"
    config_class = SmoothQuantConfig

    @property
    def cross_stage(self) -> bool:
        return self.config.smooth_down

    def required_stats(self) -> frozenset[str]:
        return frozenset({"abs_max"})

    def apply(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        if layer is None:
            return
        alpha = self.config.alpha
        for key, norm in ((QKV, layer.input_layernorm), (GATE_UP, layer.post_attention_layernorm)):
            linear = ctx.targets.get(key)
            if linear is not None and key not in ctx.quantized:
                s = smoothing_factors(ctx.stats[key].abs_max, [linear.weight], alpha)
                fold_into_norm(norm, linear, s)
                ctx.inputs_rescaled(key, s)
                ctx.log(self.name, key, max_factor=float(s.max()), min_factor=float(s.min()))
        down, gate_up = ctx.targets.get(DOWN), layer.mlp.gate_up_proj
        if self.config.smooth_down and down is not None and isinstance(gate_up, nn.Linear):
            s = smoothing_factors(ctx.stats[DOWN].abs_max, [down.weight], alpha)
            inter = ctx.config.intermediate_size
            fold_into_rows(gate_up, slice(inter, 2 * inter), down, s, s)
            ctx.inputs_rescaled(DOWN, s)
            ctx.log(self.name, DOWN, max_factor=float(s.max()), min_factor=float(s.min()))
