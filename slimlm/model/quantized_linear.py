"""``QuantizedLinear``: a linear layer whose weight is a :class:`QuantizedWeight`.

It replaces ``nn.Linear`` in a model after compression or when loading a compressed checkpoint. The
weight is held as the canonical codes + scales; ``kernel()`` prepares (once, lazily) the device's
fastest kernel for it, which both the dense forward and the paged inference forward call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimlm.kernels.quant import prepare_quantized_linear
from slimlm.model.quantized_weight import QuantizedWeight

__all__ = ["QuantizedLinear", "linear_weight"]


class QuantizedLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.kernel_backend = "auto"
        self._kernel: Callable | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def out_features(self) -> int:
        return self.qweight.out_features

    def kernel(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        if self._kernel is None:
            q = self.qweight
            self._kernel = prepare_quantized_linear(
                q.codes, q.scales, q.zero_points, q.g_idx, q.spec, self.compute_dtype, self.kernel_backend
            )
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # The codes and scales are not parameters (they must never be cast to a float dtype); move them
        # with the module, but only across devices.
        super()._apply(fn, recurse)
        q = self.qweight
        probe = fn(torch.empty(0, dtype=torch.float32, device=q.codes.device))
        if probe.device != q.codes.device:

            def move(t):
                return None if t is None else t.to(probe.device)

            self.qweight = QuantizedWeight(q.scheme, move(q.codes), move(q.scales), move(q.zero_points), move(q.g_idx))
            self._kernel = None
        return self

    def extra_repr(self) -> str:
        s = self.qweight.scheme
        return f"in={self.in_features}, out={self.out_features}, {s.kind}{s.bits}, group={s.group_size}, " + (
            f"sym={s.symmetric}, act={s.activations}"
        )


def linear_weight(module: nn.Module) -> torch.Tensor | Callable:
    """What the inference forward multiplies by: a dense weight tensor, or a quantized kernel."""
    if isinstance(module, QuantizedLinear):
        return module.kernel()
    return module.weight
