"""The transformers baseline times decode inside one generate call, from the first new token to the last."""

from __future__ import annotations

import pytest
import torch

from slimlm.bench import hf_baseline
from slimlm.bench.hf_baseline import HFBaseline


def test_decode_rate_counts_the_tokens_after_the_first(hf_checkpoints, monkeypatch):
    clocks = []

    class Recording(hf_baseline._TokenClock):
        def __init__(self):
            super().__init__()
            clocks.append(self)

    monkeypatch.setattr(hf_baseline, "_TokenClock", Recording)
    baseline = HFBaseline(str(hf_checkpoints["llama-gqa-tied"]), torch.float32)
    rate = baseline.decode_tokens_per_s([1, 2, 3, 4, 5, 6], 7)
    (clock,) = clocks
    assert len(clock.times) == 1 + 7  # the prompt, then each new token
    assert rate == pytest.approx(6 / (clock.times[-1] - clock.times[1])) and rate > 0
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        baseline.decode_tokens_per_s([1, 2, 3], 1)
