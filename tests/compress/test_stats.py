"""Input statistics: exact against their definitions, across chunks, and after a folded scale."""

from __future__ import annotations

import torch

from slimlm.compress.stats import StatsAccumulator

KINDS = frozenset({"hessian", "abs_mean", "abs_max", "samples"})


def test_statistics_match_their_definitions_across_chunks():
    for k in (48, 600):  # below and above the size where only the lower triangle is accumulated
        x = torch.randn(10, 16, k, generator=torch.Generator().manual_seed(k))
        acc = StatsAccumulator(k, KINDS, sample_sequences=3, device=torch.device("cpu"))
        for start in range(0, 10, 4):
            acc.add(x[start : start + 4], start)
        stats = acc.result()
        flat = x.reshape(-1, k)
        assert stats.tokens == 160
        assert torch.allclose(stats.hessian, flat.T @ flat / 160, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.hessian, stats.hessian.T)
        assert torch.allclose(stats.abs_mean, flat.abs().mean(0))
        assert torch.equal(stats.abs_max, flat.abs().amax(0))
        assert torch.equal(stats.samples, x[:3])


def test_rescale_follows_the_inputs():
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(0))
    s = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5
    a = StatsAccumulator(32, KINDS, 2, torch.device("cpu"))
    b = StatsAccumulator(32, KINDS, 2, torch.device("cpu"))
    a.add(x, 0)
    b.add(x / s, 0)
    stats, expected = a.result(), b.result()
    stats.rescale(s)
    for name in ("hessian", "abs_mean", "abs_max", "samples"):
        assert torch.allclose(getattr(stats, name), getattr(expected, name), rtol=1e-5, atol=1e-6), name


def test_only_what_is_asked():
    acc = StatsAccumulator(16, frozenset({"abs_max"}), 4, torch.device("cpu"))
    acc.add(torch.randn(2, 4, 16), 0)
    stats = acc.result()
    assert stats.abs_max is not None and stats.hessian is None and stats.abs_mean is None and stats.samples is None
