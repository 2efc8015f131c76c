"""Statistics of a linear layer's inputs over the calibration set, accumulated chunk by chunk.

What each algorithm reads: GPTQ the Hessian ``X^T X / n``; AWQ the channel means ``mean|x|`` and a few
whole sequences (its search reruns attention on them); SmoothQuant the channel maxima ``max|x|``. Only
the kinds some modifier asks for are gathered. All accumulate in float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["STAT_KINDS", "InputStats", "StatsAccumulator"]

STAT_KINDS = frozenset({"hessian", "abs_mean", "abs_max", "samples"})

# Above this many input features the Hessian is accumulated in column panels of the lower triangle only:
# X^T X is symmetric, so about half the multiply-adds (the bulk of calibration time on a CPU) are spared.
_PANEL = 256


@dataclass
class InputStats:
    """Statistics of one linear's inputs ``x [tokens, K]``."""

    tokens: int
    hessian: torch.Tensor | None = None  # [K, K] mean of x x^T
    abs_mean: torch.Tensor | None = None  # [K]
    abs_max: torch.Tensor | None = None  # [K]
    samples: torch.Tensor | None = None  # [S, L, K], the first S calibration sequences

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became ``x / s`` (a scale was folded into the layer before): update every statistic."""
        inv = 1.0 / s.float()
        if self.hessian is not None:
            inv_h = inv.to(self.hessian.device)
            self.hessian.mul_(inv_h[:, None] * inv_h[None, :])
        if self.abs_mean is not None:
            self.abs_mean.mul_(inv.to(self.abs_mean.device))
        if self.abs_max is not None:
            self.abs_max.mul_(inv.to(self.abs_max.device))
        if self.samples is not None:
            self.samples.mul_(inv.to(self.samples.device, self.samples.dtype))


class StatsAccumulator:
    """Collects :class:`InputStats` of ``kinds`` from chunks of sequences ``x [b, L, K]``."""

    def __init__(self, in_features: int, kinds: frozenset[str], sample_sequences: int, device: torch.device):
        unknown = set(kinds) - STAT_KINDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
        self.kinds = kinds
        self.k = in_features
        self.sample_sequences = sample_sequences if "samples" in kinds else 0
        self.tokens = 0
        f32 = dict(dtype=torch.float32, device=device)
        self._gram = torch.zeros(in_features, in_features, **f32) if "hessian" in kinds else None
        self._abs_sum = torch.zeros(in_features, **f32) if "abs_mean" in kinds else None
        self._abs_max = torch.zeros(in_features, **f32) if "abs_max" in kinds else None
        self._samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, first_sequence: int) -> None:
        """Adds a chunk of whole sequences ``x [b, L, K]`` whose first is calibration sequence ``first_sequence``."""
        keep = self.sample_sequences - first_sequence
        if keep > 0:
            self._samples.append(x[:keep].detach().float().clone())
        flat = x.detach().reshape(-1, self.k).float()
        self.tokens += flat.shape[0]
        if self._gram is not None:
            _add_lower_gram(self._gram, flat)
        if self._abs_sum is not None or self._abs_max is not None:
            a = flat.abs()
            if self._abs_sum is not None:
                self._abs_sum.add_(a.sum(dim=0))
            if self._abs_max is not None:
                torch.maximum(self._abs_max, a.amax(dim=0), out=self._abs_max)

    def result(self) -> InputStats:
        n = max(self.tokens, 1)
        hessian = None
        if self._gram is not None:
            lower = torch.tril(self._gram)
            hessian = (lower + torch.tril(lower, -1).T).div_(n)
        return InputStats(
            tokens=self.tokens,
            hessian=hessian,
            abs_mean=None if self._abs_sum is None else self._abs_sum / n,
            abs_max=self._abs_max,
            samples=torch.cat(self._samples) if self._samples else None,
        )


def _add_lower_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` on (at least) the lower triangle: exact below and on the diagonal, junk above."""
    k = x.shape[1]
    if k <= 2 * _PANEL:
        acc.addmm_(x.T, x)
        return
    for p in range(0, k, _PANEL):
        q = min(p + _PANEL, k)
        acc[p:, p:q].addmm_(x[:, p:].T, x[:, p:q])
