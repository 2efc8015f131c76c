"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then weight clipping, then RTN.

Scaling input channel ``j`` of a weight up by ``s_j`` (and its input down by ``s_j``) leaves the float
output unchanged but shrinks channel ``j``'s *relative* rounding error, because the group's scale is set
by the other channels. Channels that see large activations matter most, so ``s = mean|x|^alpha``
(normalised to geometric mean 1), with ``alpha`` chosen on a grid by the error of the block's output on
calibration inputs; ``alpha = 0`` is plain RTN, so the search never does worse on its own objective.

The search compares *effective* weights ``Q(W diag(s)) diag(s)^-1``: applied to the original inputs they
give exactly what the folded, quantized model computes, so candidates are scored without touching the
model. Clipping then shrinks each group's range where the saved rounding error on typical inputs
outweighs the clipped extremes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimlm.compress.quantize import fake_quantize, group_size_of
from slimlm.model.quantized_weight import QuantScheme

__all__ = ["AWQSearch", "awq_clip_search", "awq_scales", "awq_search_scales", "clip_weight"]


@dataclass
class AWQSearch:
    scales: torch.Tensor  # [C], in the space of x_mean (before any expansion to the weight's columns)
    alpha: float
    loss: float
    rtn_loss: float  # alpha = 0: no scaling


def awq_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``x_mean^alpha`` (divided by ``w_mean^(1-alpha)`` with duo scaling), normalised so that
    ``sqrt(max * min) = 1`` and the weights' overall magnitude stays put."""
    s = x_mean.float().pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.float().pow(1.0 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_magnitude(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Mean over rows of ``|w| / group absmax`` per input column: how much of its group's range it uses."""
    n, k = weight.shape
    gs = group_size_of(scheme, k)
    w = weight.detach().float().abs().reshape(n, k // gs, gs)
    return (w / (w.amax(dim=-1, keepdim=True) + 1e-6)).reshape(n, k).mean(dim=0)


def awq_search_scales(
    weight: torch.Tensor,
    x_mean: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], float],
    scheme: QuantScheme,
    *,
    grid: int = 20,
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
    duo_scaling: bool = False,
) -> AWQSearch:
    """Best scales for ``weight [N, K]`` whose inputs have per-channel ``x_mean = mean|x|``.

    ``loss_fn(effective_weight [N, K])`` returns the block output error with the weight replaced.
    ``expand`` maps scales ``[C]`` onto the ``K`` columns when channels are tied (e.g. one scale per
    key/value channel shared by the query heads of a GQA group); ``x_mean`` is then ``[C]``.
    """
    if grid < 1:
        raise ValueError(f"awq: grid must be >= 1, not {grid}")
    w = weight.detach().float()
    w_mean = None
    if duo_scaling:
        if expand is not None:
            raise ValueError("awq: duo_scaling cannot be combined with tied (expanded) scales")
        w_mean = weight_magnitude(w, scheme)
    expand = expand or (lambda s: s)
    results = []
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha, w_mean)
        cols = expand(s).to(w.device)
        results.append((float(loss_fn(fake_quantize(w * cols, scheme) / cols)), alpha, s))
    loss, alpha, s = min(results, key=lambda r: r[0])
    # alpha = 0 with duo scaling still divides by w_mean, so plain RTN is scored on its own here.
    rtn_loss = results[0][0] if w_mean is None else float(loss_fn(fake_quantize(w, scheme)))
    return AWQSearch(scales=s, alpha=alpha, loss=loss, rtn_loss=rtn_loss)


def awq_clip_search(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    rows_per_batch: int = 256,
) -> torch.Tensor:
    """Per-group clipping thresholds ``[N, G]`` for ``weight [N, K]`` that minimise the mean squared error
    of each group's partial output ``x_g . w_g`` over (up to ``max_tokens``) rows of ``inputs [T, K]``.

    Candidates shrink the group's absmax by ``1 - i / grid`` for ``i < max_shrink * grid``.
    """
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"awq: max_shrink must be in [0, 1), not {max_shrink}")
    n, k = weight.shape
    gs = group_size_of(scheme, k)
    g = k // gs
    x = inputs.reshape(-1, k).float()
    x = x[:: max(1, x.shape[0] // max_tokens)][:max_tokens]
    xg = x.reshape(-1, g, gs).transpose(0, 1)  # [G, T, gs]
    w = weight.detach().float().to(x.device)
    best_max = torch.empty(n, g, device=w.device)
    steps = max(1, int(max_shrink * grid))
    for r0 in range(0, n, rows_per_batch):
        wb = w[r0 : r0 + rows_per_batch]
        rows = wb.shape[0]
        wg = wb.reshape(rows, g, gs)
        org_max = wg.abs().amax(dim=-1)  # [rows, G]
        ref = torch.bmm(xg, wg.permute(1, 2, 0))  # [G, T, rows]
        min_err = torch.full((rows, g), float("inf"), device=w.device)
        chosen = org_max.clone()
        for i in range(steps):
            max_val = org_max * (1.0 - i / grid)
            clipped = torch.maximum(torch.minimum(wg, max_val.unsqueeze(-1)), -max_val.unsqueeze(-1))
            q = fake_quantize(clipped.reshape(rows, k), scheme).reshape(rows, g, gs)
            out = torch.bmm(xg, q.permute(1, 2, 0))
            err = (out - ref).pow(2).mean(dim=1).transpose(0, 1)  # [rows, G]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            chosen = torch.where(better, max_val, chosen)
        best_max[r0 : r0 + rows] = chosen
    return best_max


def clip_weight(weight: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` clamped to ``[-max_val, max_val]`` per group (``max_val [N, G]``)."""
    n, k = weight.shape
    g = max_val.shape[1]
    w = weight.float().reshape(n, g, k // g)
    lim = max_val.unsqueeze(-1)
    return torch.maximum(torch.minimum(w, lim), -lim).reshape(n, k).to(weight.dtype)
