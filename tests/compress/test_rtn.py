"""RTN against its definition: codes in range, every weight within half a step of its code's value."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress.quantize import fake_quantize
from slimlm.compress.rtn import rtn_quantize
from slimlm.model.quantized_weight import QuantScheme

SCHEMES = [QuantScheme(bits=8, group_size=-1)] + [
    QuantScheme(bits=b, group_size=g, symmetric=s) for b in (4, 3, 2) for g in (32, 64, 128) for s in (True, False)
]


def weight(n=48, k=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[3] += 0.2  # a row that is all positive: the asymmetric range must still include zero
    w[5] = 0.0  # an all-zero row
    return w


def scheme_id(s: QuantScheme) -> str:
    return f"int{s.bits}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}"


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_codes_in_range_and_error_within_half_a_step(scheme):
    w = weight()
    q = rtn_quantize(w, scheme)
    assert q.codes.dtype == torch.int8 and q.shape == w.shape
    assert int(q.codes.min()) >= scheme.qmin and int(q.codes.max()) <= scheme.qmax
    assert q.scales.shape == (w.shape[0], scheme.num_groups(w.shape[1]))
    assert bool((q.scales > 0).all())
    if scheme.symmetric:
        assert q.zero_points is None
    else:
        assert int(q.zero_points.min()) >= scheme.qmin and int(q.zero_points.max()) <= scheme.qmax
    step = q.scales[:, q.group_index()]
    err = (q.dequantize() - w).abs()
    assert bool((err <= step / 2 + 1e-7).all())
    assert torch.equal(q.dequantize()[5], torch.zeros(w.shape[1]))  # zeros stay exact
    assert torch.allclose(fake_quantize(w, scheme), q.dequantize())


def test_symmetric_scale_uses_the_full_signed_range():
    w = torch.tensor([[-0.4, 0.5, 0.3, 1.0]])
    q = rtn_quantize(w, QuantScheme(bits=4, group_size=-1))
    assert float(q.scales[0, 0]) == pytest.approx(1 / 7.5)  # absmax / ((qmax - qmin) / 2)
    assert q.codes.tolist() == [[-3, 4, 2, 7]]  # +1.0 would be code 7.5: clamped to 7, off by half a step


def test_fewer_bits_larger_error():
    w = weight()
    errs = [float((rtn_quantize(w, QuantScheme(bits=b, group_size=64)).dequantize() - w).norm()) for b in (8, 4, 3, 2)]
    assert errs == sorted(errs)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(torch.randn(4, 96), QuantScheme(bits=4, group_size=64))
    with pytest.raises(ValueError, match="kind"):
        rtn_quantize(torch.randn(4, 64), QuantScheme(bits=4, group_size=64, kind="nf4"))
