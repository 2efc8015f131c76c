"""GPTQ against its definition: lower output error than RTN on correlated inputs, valid act-order groups."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress.gptq import gptq_quantize, inverse_hessian_factor
from slimlm.compress.rtn import rtn_quantize
from slimlm.model.quantized_weight import QuantScheme
from tests.compress.tiny_models import correlated_inputs, rel_error

K, N = 256, 64


@pytest.fixture(scope="module")
def problem():
    x = correlated_inputs(4096, K)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05
    return x, w, x.T @ x / x.shape[0]


def output_error(x, w, q):
    return rel_error(x @ q.dequantize().T, x @ w.T)


CASES = [
    (QuantScheme(bits=4, group_size=128), False),
    (QuantScheme(bits=4, group_size=128), True),
    (QuantScheme(bits=4, group_size=64, symmetric=False), False),
    (QuantScheme(bits=4, group_size=64, symmetric=False), True),
    (QuantScheme(bits=3, group_size=128), False),
    (QuantScheme(bits=3, group_size=128), True),
    (QuantScheme(bits=8, group_size=-1), False),
    (QuantScheme(bits=8, group_size=-1), True),
    # At 2 bits the compensation inflates the weights that later groups take their range from, so
    # dynamic groups gain little without act-order (as in the reference implementation).
    (QuantScheme(bits=2, group_size=32, symmetric=False), True),
]


@pytest.mark.parametrize("scheme,act_order", CASES, ids=[f"{s.bits}b-g{s.group_size}-ao{a}" for s, a in CASES])
def test_lower_output_error_than_rtn(problem, scheme, act_order):
    x, w, h = problem
    q = gptq_quantize(w, h, scheme, act_order=act_order)
    assert int(q.codes.min()) >= scheme.qmin and int(q.codes.max()) <= scheme.qmax
    assert output_error(x, w, q) < 0.9 * output_error(x, w, rtn_quantize(w, scheme))


def test_act_order_with_groups_yields_a_valid_g_idx(problem):
    x, w, h = problem
    scheme = QuantScheme(bits=4, group_size=32)
    q = gptq_quantize(w, h, scheme, act_order=True)
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32 and q.g_idx.shape == (K,)
    # every group holds exactly group_size columns: those visited together in decreasing diag(H) order
    assert torch.bincount(q.g_idx.long(), minlength=K // 32).tolist() == [32] * (K // 32)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    assert torch.equal(q.g_idx[perm].long(), torch.arange(K) // 32)
    assert not torch.equal(q.g_idx.long(), torch.arange(K) // 32)  # the groups really are permuted
    assert output_error(x, w, q) < output_error(x, w, gptq_quantize(w, h, scheme))


@pytest.mark.parametrize("bits", [4, 2])
def test_static_groups_keep_the_contiguous_layout(problem, bits):
    x, w, h = problem
    scheme = QuantScheme(bits=bits, group_size=32)
    q = gptq_quantize(w, h, scheme, act_order=True, static_groups=True)
    assert q.g_idx is None
    assert output_error(x, w, q) < 0.9 * output_error(x, w, rtn_quantize(w, scheme))


def test_uncorrelated_inputs_reduce_to_rtn():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    scheme = QuantScheme(bits=4, group_size=64)
    q = gptq_quantize(w, torch.eye(K), scheme)  # nothing to compensate with: every column rounds alone
    assert torch.equal(q.codes, rtn_quantize(w, scheme).codes)


def test_dead_inputs_get_zero_weights(problem):
    _, w, h = problem
    h = h.clone()
    h[7, :] = 0
    h[:, 7] = 0
    q = gptq_quantize(w, h, QuantScheme(bits=4, group_size=64))
    assert torch.equal(q.dequantize()[:, 7], torch.zeros(N))


def test_rejects_bad_arguments(problem):
    _, w, h = problem
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, h[:10, :10], QuantScheme())
    with pytest.raises(ValueError, match="dampening_frac"):
        gptq_quantize(w, h, QuantScheme(), dampening_frac=0.0)


def test_inverse_hessian_factor(problem):
    _, _, h = problem
    u = inverse_hessian_factor(h, 0.01).double()
    damped = h.double() + 0.01 * torch.diagonal(h).mean().double() * torch.eye(K, dtype=torch.float64)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)
    singular = torch.zeros(K, K)
    singular[0, 0] = 1.0  # rank one: only the dampening makes it invertible
    assert torch.isfinite(inverse_hessian_factor(singular, 0.01)).all()
