"""``awq``: activation-aware scaling + clipping, then round-to-nearest (see ``slimlm.compress.awq``).

Four scale mappings per layer, each scored on the output of the block that consumes the scaled linear:

- qkv_proj, folded into ``input_layernorm``, scored on the attention output (q and k errors matter through
  the softmax, which the qkv output alone would not show);
- o_proj, folded into the value rows of qkv_proj. With GQA a value channel feeds ``num_heads /
  num_kv_heads`` query heads' channels of o_proj's input, so one scale per value channel is shared by all
  of them (``tie``), which keeps the fold exact for any head layout;
- gate_up_proj, folded into ``post_attention_layernorm``, scored on the MLP output;
- down_proj, folded into the up rows of gate_up_proj.

Clipping skips the q and k rows (as AWQ does): their errors reach the output through the softmax, which
the per-group linear error used by the clip search does not model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.compress.awq import awq_clip_search, awq_search_scales, clip_weight
from slimlm.compress.folding import fold_into_norm, fold_into_rows
from slimlm.compress.modifiers.base import DOWN, GATE_UP, QKV, LayerContext, O, QuantConfig, QuantizingModifier
from slimlm.compress.rtn import rtn_quantize
from slimlm.kernels.reference import silu_and_mul

__all__ = ["AWQConfig", "AWQModifier"]


@dataclass
class AWQConfig(QuantConfig):
    grid: int = 20  # alphas 0, 1/grid, ... (grid-1)/grid
    duo_scaling: bool = False  # divide by the weights' mean magnitude^(1 - alpha) too (AutoAWQ's later variant)
    scale_o_proj: bool = True  # o_proj's scale folded into v (tied across a GQA group)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5  # clip down to at most (1 - max_shrink) of a group's absmax
    clip_tokens: int = 512  # tokens scored per clip candidate
    search_tokens: int = 8192  # calibration tokens the scale search scores each candidate on

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("grid", "clip_grid", "clip_tokens", "search_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"awq: {name} must be >= 1, not {getattr(self, name)}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"awq: max_shrink must be in [0, 1), not {self.max_shrink}")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.float(), b.float()))


def _block_loss(block: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """Mean squared error of ``block``'s output with a candidate weight against the float weight's."""
    reference = block(weight)
    return lambda w_eff: _mse(block(w_eff), reference)


def _linear_loss(x: torch.Tensor, weight: torch.Tensor, candidates: int) -> Callable[[torch.Tensor], float]:
    """:func:`_block_loss` of the plain linear ``x @ w.T``, from the Gram matrix of ``x`` where that is cheaper.

    ``mean((x D^T)^2) = sum((D G) * D) / (T N)`` with ``D = w_eff - w`` and ``G = x^T x``: ``N K^2`` work per
    candidate instead of ``T K N``, plus ``T K^2`` once (py-target's down_proj: a quarter of the work).
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    (t, k), n = flat.shape, weight.shape[0]
    if k * (t + candidates * n) >= candidates * t * n:
        return _block_loss(lambda w: F.linear(flat, w), weight)
    gram = flat.T @ flat
    w = weight.float()

    def loss(w_eff: torch.Tensor) -> float:
        d = w_eff.float() - w
        return float(((d @ gram) * d).sum()) / (t * n)

    return loss


class _SwappedWeight:
    """Temporarily runs ``linear`` with another weight (the search's candidates)."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        self.linear, self.weight = linear, weight

    def __enter__(self):
        self.saved = self.linear.weight.data
        self.linear.weight.data = self.weight.to(self.saved.dtype)

    def __exit__(self, *exc):
        self.linear.weight.data = self.saved


class AWQModifier(QuantizingModifier):
    name = "awq"
    config_class = AWQConfig

    @property
    def cross_stage(self) -> bool:
        return True

    def required_stats(self) -> frozenset[str]:
        return frozenset({"abs_mean", "samples"})

    def sample_tokens(self) -> int:
        return self.config.search_tokens

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        self.scale(ctx)
        scheme = self.scheme
        for key, linear in ctx.pending():
            samples = ctx.stats[key].samples if key in ctx.stats else None
            if self.config.clip and samples is not None:
                self._clip(ctx, key, linear, samples)
            ctx.quantized[key] = rtn_quantize(linear.weight, scheme)

    @torch.no_grad()
    def scale(self, ctx: LayerContext) -> None:
        """Searches and folds the four scale mappings; the layer's float function does not change."""
        layer = ctx.layer
        if layer is None:
            return
        if QKV in ctx.targets:
            self._scale_qkv(ctx)
        if O in ctx.targets and self.config.scale_o_proj and isinstance(layer.self_attn.qkv_proj, nn.Linear):
            self._scale_o(ctx)
        if GATE_UP in ctx.targets:
            self._scale_gate_up(ctx)
        if DOWN in ctx.targets and isinstance(layer.mlp.gate_up_proj, nn.Linear):
            self._scale_down(ctx)

    def _search(self, ctx, key, weight, x_mean, loss_fn: Callable[[torch.Tensor], float], expand=None):
        result = awq_search_scales(
            weight,
            x_mean,
            loss_fn,
            self.scheme,
            grid=self.config.grid,
            expand=expand,
            duo_scaling=self.config.duo_scaling and expand is None,
        )
        ctx.log(self.name, key, alpha=result.alpha, loss=result.loss, rtn_loss=result.rtn_loss)
        return result.scales

    def _scale_qkv(self, ctx: LayerContext) -> None:
        attn, stats = ctx.layer.self_attn, ctx.stats[QKV]
        x = stats.samples
        positions = ctx.positions(x.shape[0], x.shape[1])

        def block(w):
            with _SwappedWeight(attn.qkv_proj, w):
                return attn.forward_dense(x, positions, ctx.cos_sin)

        weight = attn.qkv_proj.weight
        s = self._search(ctx, QKV, weight, stats.abs_mean, _block_loss(block, weight))
        fold_into_norm(ctx.layer.input_layernorm, attn.qkv_proj, s)
        ctx.inputs_rescaled(QKV, s)

    def _scale_o(self, ctx: LayerContext) -> None:
        attn, stats, cfg = ctx.layer.self_attn, ctx.stats[O], ctx.config
        group = cfg.num_heads // cfg.num_kv_heads
        kv, hd = cfg.num_kv_heads, cfg.head_dim
        x = stats.samples

        def tie(s):  # one scale per value channel, repeated over the query heads that read it
            return s.view(kv, 1, hd).expand(kv, group, hd).reshape(-1)

        x_mean = stats.abs_mean.view(kv, group, hd).mean(dim=1).reshape(-1)
        weight = attn.o_proj.weight
        s = self._search(ctx, O, weight, x_mean, _linear_loss(x, weight, self.config.grid + 1), expand=tie)
        v_rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
        fold_into_rows(attn.qkv_proj, v_rows, attn.o_proj, s, tie(s))
        ctx.inputs_rescaled(O, tie(s))

    def _scale_gate_up(self, ctx: LayerContext) -> None:
        mlp, stats = ctx.layer.mlp, ctx.stats[GATE_UP]
        x = stats.samples

        def block(w):
            return mlp.down_proj(silu_and_mul(F.linear(x, w, mlp.gate_up_proj.bias)))

        weight = mlp.gate_up_proj.weight
        s = self._search(ctx, GATE_UP, weight, stats.abs_mean, _block_loss(block, weight))
        fold_into_norm(ctx.layer.post_attention_layernorm, mlp.gate_up_proj, s)
        ctx.inputs_rescaled(GATE_UP, s)

    def _scale_down(self, ctx: LayerContext) -> None:
        mlp, stats = ctx.layer.mlp, ctx.stats[DOWN]
        x = stats.samples
        weight = mlp.down_proj.weight
        s = self._search(ctx, DOWN, weight, stats.abs_mean, _linear_loss(x, weight, self.config.grid + 1))
        inter = ctx.config.intermediate_size
        fold_into_rows(mlp.gate_up_proj, slice(inter, 2 * inter), mlp.down_proj, s, s)
        ctx.inputs_rescaled(DOWN, s)

    def _clip(self, ctx: LayerContext, key: str, linear: nn.Linear, samples: torch.Tensor) -> None:
        rows = slice(None)
        if key == QKV:
            rows = slice(ctx.config.q_size + ctx.config.kv_size, None)
        w = linear.weight.data[rows]
        c = self.config
        max_val = awq_clip_search(
            w, samples, self.scheme, grid=c.clip_grid, max_shrink=c.max_shrink, max_tokens=c.clip_tokens
        )
        linear.weight.data[rows] = clip_weight(w, max_val)
