"""Quantized linear kernels: ``prepare_quantized_linear(...)`` returns a callable ``(x, bias) -> y``.

The weight arrives as the model's canonical form (unpacked int8 codes, per-group scales, optional
zero points and act-order ``g_idx``; see ``slimlm.model.quantized_weight``); a kernel may repack it
into its own layout once, at preparation. This file holds the dispatch and the pure-torch reference
that runs on every device; the CPU kernels of ``slimlm.kernels.cpu_quant`` plug in behind the same call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["NF4_TABLE", "QuantLinearSpec", "prepare_quantized_linear", "dequantize"]

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "cpu")

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero.
NF4_TABLE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


@dataclass(frozen=True)
class QuantLinearSpec:
    """What a kernel needs to know besides the tensors."""

    bits: int
    group_size: int  # -1: channel-wise
    kind: str = "int"  # "int" | "nf4"
    activations: str | None = None  # None | "int8-token"


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: QuantLinearSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[N, K]`` weight the codes stand for: the semantics every kernel must match."""
    k = codes.shape[1]
    if g_idx is not None:
        idx = g_idx.long()
    else:
        idx = torch.arange(k, device=codes.device) // (k if spec.group_size == -1 else spec.group_size)
    if spec.kind == "nf4":
        values = NF4_TABLE.to(codes.device)[codes.long()]
    else:
        values = codes.float()
        if zero_points is not None:
            values = values - zero_points.float()[:, idx]
    return (values * scales.float()[:, idx]).to(dtype)


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: ``(codes int8 [M, K], scales float32 [M, 1])``."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def _reference(codes, scales, zero_points, g_idx, spec: QuantLinearSpec, compute_dtype) -> Callable:
    weight = dequantize(codes, scales, zero_points, g_idx, spec, compute_dtype)
    if spec.activations == "int8-token":
        w_int = codes.float()
        w_scale = scales.float().view(1, -1)

        def w8a8(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            shape = x.shape
            xq, xs = quantize_activations_per_token(x.reshape(-1, shape[-1]))
            # Integer products summed in float64 are exact for any realistic K (< 2**37).
            acc = (xq.double() @ w_int.double().T).float()
            y = acc * xs * w_scale
            if bias is not None:
                y = y + bias.float()
            return y.to(x.dtype).view(*shape[:-1], -1)

        return w8a8

    def weight_only(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    return weight_only


_cpu_error: BaseException | None = None
_warned = False


def _cpu_kernel(codes, scales, zero_points, g_idx, spec: QuantLinearSpec) -> Callable | None:
    """The C++ kernel for this weight, None where it has none; raises if the extension cannot be built."""
    global _cpu_error
    if _cpu_error is not None:
        raise _cpu_error
    from slimlm.kernels import cpu_quant

    try:
        if not cpu_quant.available():
            raise RuntimeError("the quantized CPU kernels need an x86-64 CPU with AVX2 and FMA")
        cpu_quant.load()
    except Exception as exc:  # compiler missing, build error, ...
        _cpu_error = exc
        raise
    return cpu_quant.prepare(codes, scales, zero_points, g_idx, spec)


def prepare_quantized_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    spec: QuantLinearSpec,
    compute_dtype: torch.dtype,
    backend: str = "auto",
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A callable ``(x [.., K], bias [N] | None) -> [.., N]`` computing ``x @ W.T + bias``.

    ``backend``: "torch" (the reference: dequantizes once to ``compute_dtype``), "auto" (on CPU devices the
    C++ kernels of ``slimlm.kernels.cpu_quant``, built on first use; the reference on other devices, for
    the rare layouts those kernels do not cover, and, after one warning, when they cannot be built) or
    "cpu" (those kernels or an error). ``SLIMLM_KERNELS=torch`` forces the reference. The CPU kernels
    output x's dtype with fp32 math; up to a few hundred rows of x their weight-only paths quantize x to
    int8 per block (relative error ~7e-3 of the reference on Gaussian x; see ``cpu_quant``), above that
    they match the reference to fp32 rounding; W8A8 is bit-exact.
    """
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    forced_torch = os.environ.get("SLIMLM_KERNELS", "").strip().lower() == "torch"
    if backend == "cpu" and codes.device.type != "cpu" and not forced_torch:
        raise ValueError(f"kernel backend 'cpu' needs a CPU device, got {codes.device}")
    if backend == "torch" or forced_torch or codes.device.type != "cpu":
        return _reference(codes, scales, zero_points, g_idx, spec, compute_dtype)
    try:
        kernel = _cpu_kernel(codes, scales, zero_points, g_idx, spec)
    except Exception as exc:
        if backend == "cpu":
            raise RuntimeError(
                f"could not build the quantized CPU kernels ({type(exc).__name__}: {exc}); "
                "use backend 'torch' or SLIMLM_KERNELS=torch for the reference"
            ) from exc
        if not _warned:
            _warned = True
            logger.warning(
                "quantized CPU kernels unavailable (%s: %s); using the slower reference",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
        kernel = None
    if kernel is None:
        return _reference(codes, scales, zero_points, g_idx, spec, compute_dtype)
    return kernel
