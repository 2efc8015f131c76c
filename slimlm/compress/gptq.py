"""GPTQ (Frantar et al. 2022): quantize one column at a time and push each rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss ``||X W^T - X Q^T||``.

``H = X^T X / n`` comes from calibration inputs. The loop follows the paper's Algorithm 1: the Cholesky
factor of ``H^-1`` replaces the repeated rank-1 downdates of the inverse, and updates are applied lazily
per block of columns (the whole block's error reaches the rest of the matrix in one matmul).

Groups: with act-order the columns are visited in decreasing ``diag(H)`` (most-used inputs first, while
there is the most freedom to compensate). Group parameters are then computed from the *updated* weights
of the next ``group_size`` visited columns, so a group is a set of columns in visit order and ``g_idx``
records it. ``static_groups`` instead fixes contiguous groups from the original weights up front, which
keeps the standard layout (no ``g_idx``) at a small cost in accuracy.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from slimlm.compress.quantize import compute_qparams, dequantize_codes, group_size_of, quantize_codes
from slimlm.model.quantized_weight import QuantizedWeight, QuantScheme

__all__ = ["gptq_quantize", "inverse_hessian_factor"]

logger = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1``, i.e. ``U^T U = (H + damp I)^-1``, with
    ``damp = dampening_frac * mean(diag(H))``.

    With ``J`` the order-reversing permutation and ``M = chol(J H J)`` (lower), ``U = J M^-1 J``: one
    Cholesky and one triangular inverse, several times faster on a CPU than inverting ``H`` and factoring
    again. Computed in float64: the inverse of a near-singular Hessian loses too many digits in float32.
    If the dampened matrix is still not positive definite the dampening grows tenfold, up to four times.
    """
    h = hessian.double()
    mean_diag = float(torch.diagonal(h).mean())
    damp = dampening_frac * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = torch.flip(h, (0, 1))
    for attempt in range(5):
        m, info = torch.linalg.cholesky_ex(flipped + damp * eye)
        if int(info) == 0:
            if attempt:
                logger.warning("gptq: the Hessian needed %.3g x mean(diag) dampening", damp / mean_diag)
            m_inv = torch.linalg.solve_triangular(m, eye, upper=False)
            return torch.flip(m_inv, (0, 1)).float()
        damp = max(damp * 10, 1e-8)
    raise ValueError(
        "gptq: the Hessian is not positive definite even with 10000x the dampening; raise dampening_frac "
        "or check the calibration inputs (all-zero or NaN activations?)"
    )


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """The column loop is thousands of small ops: on a CPU, fork/join overhead outweighs a second thread
    there (by 10x when the machine is busy), while the block updates between loops keep every thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> QuantizedWeight:
    """``weight [N, K]`` quantized to ``scheme`` minimising the output error on inputs with ``hessian [K, K]``."""
    if scheme.kind != "int":
        raise ValueError(f"gptq: scheme kind must be 'int', not {scheme.kind!r}")
    if block_size <= 0:
        raise ValueError(f"gptq: block_size must be > 0, not {block_size}")
    if not 0 < dampening_frac < 1:
        raise ValueError(f"gptq: dampening_frac must be in (0, 1), not {dampening_frac}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq: hessian has shape {tuple(hessian.shape)}, expected {(k, k)}")
    gs = group_size_of(scheme, k)
    num_groups = k // gs
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()

    # Inputs that never fire carry no information: any value is as good, so fix them to zero.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Dynamic groups take their range from already-updated weights, as they are reached.
    dynamic = num_groups > 1 and not static_groups
    scales = torch.ones(n, num_groups, device=w.device)
    zeros = None if scheme.symmetric else torch.zeros(n, num_groups, device=w.device)
    if not dynamic:
        s, z = compute_qparams(w.reshape(n, num_groups, gs), scheme)
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    if dynamic or perm is None:
        col_group = (torch.arange(k) // gs).tolist()
    else:
        col_group = (perm.cpu() // gs).tolist()  # fixed groups follow the original column

    u = inverse_hessian_factor(h, dampening_frac)
    del h
    if dynamic:  # a group must not straddle two blocks: its range is read from the current block
        block_size = max(block_size // gs, 1) * gs
    # Work on W^T: each visited column is then a contiguous row, and so is each update.
    wt = w.T.contiguous()
    del w
    scales_t = scales.T.contiguous()
    zeros_t = None if zeros is None else zeros.T.contiguous()
    codes_t = torch.empty(k, n, device=wt.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty(i2 - i1, n, device=wt.device)
        u1 = u[i1:i2, i1:i2]
        diag = torch.diagonal(u1).tolist()
        with _one_thread(wt.device):
            for i in range(i2 - i1):
                col = i1 + i
                g = col_group[col]
                if dynamic and col % gs == 0:
                    s, z = compute_qparams(w1[i : i + gs].T, scheme)
                    scales_t[g] = s
                    if zeros_t is not None:
                        zeros_t[g] = z
                scale = scales_t[g]
                zero = None if zeros_t is None else zeros_t[g]
                row = w1[i]
                q = quantize_codes(row, scale, zero, scheme)
                codes_t[col] = q
                e = (row - dequantize_codes(q, scale, zero)).div_(diag[i])
                w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
                err1[i] = e
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

    codes = codes_t.T
    scales = scales_t.T.contiguous()
    zeros = None if zeros_t is None else zeros_t.T.contiguous()
    g_idx = None
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
        if dynamic:
            g_idx = torch.empty(k, dtype=torch.int32, device=codes.device)
            g_idx[perm] = (torch.arange(k, device=codes.device) // gs).to(torch.int32)
    return QuantizedWeight(
        scheme=scheme,
        codes=codes.to(torch.int8).contiguous(),
        scales=scales,
        zero_points=None if zeros is None else zeros.to(torch.int8),
        g_idx=g_idx,
    )
