"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8 quantization.

Per-token int8 activations fail on the few input channels whose magnitude dwarfs the rest: one scale per
token is set by the outlier and every other channel rounds to a handful of levels. Dividing channel ``j``
of the input by ``s_j`` and multiplying column ``j`` of the weight by ``s_j`` leaves ``X W^T`` unchanged;
with ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the two maxima meet in the middle (alpha = 0.5),
so both sides quantize well. The division is folded into the RMSNorm weight in front of the linear, so
the smoothed model costs nothing extra at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["smoothing_factors"]


def smoothing_factors(
    act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel factors ``s [K]`` for linears ``weights [N_i, K]`` that share inputs with channel
    maxima ``act_absmax [K]``: divide the inputs by ``s``, multiply the weights' columns by ``s``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], not {alpha}")
    if not weights:
        raise ValueError("smoothquant: no weights to smooth")
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device).clamp_min(eps)
    s = a.pow(alpha) / w_absmax.clamp_min(eps).pow(1.0 - alpha)
    return s.clamp_min(eps)
