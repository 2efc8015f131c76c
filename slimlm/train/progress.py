"""The progress bar of a training run (tqdm): steps, with loss, learning rate and smoothed tokens/s."""

from __future__ import annotations

__all__ = ["StepProgress"]


class StepProgress:
    def __init__(self, *, total: int, initial: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm  # not at import time: slimlm.train stays cheap to import

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc)
        self._tokens_per_second: float | None = None

    def advance(self, *, loss: float, lr: float, tokens_per_second: float) -> None:
        # An exponential average: single steps vary too much (other processes, checkpoints) to read.
        ema = self._tokens_per_second
        self._tokens_per_second = tokens_per_second if ema is None else 0.9 * ema + 0.1 * tokens_per_second
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self._tokens_per_second:.0f}", refresh=False)

    def set_total(self, total: int) -> None:
        self._bar.total = total

    def close(self) -> None:
        self._bar.close()
