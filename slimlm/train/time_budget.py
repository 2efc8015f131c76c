"""Step timing of one process's run: when to stop at ``time_limit``, how long a fitted schedule can be."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from slimlm.train.config import TrainConfig

__all__ = ["RunTimer"]

logger = logging.getLogger(__name__)


def _upper_median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@dataclass
class RunTimer:
    """Timings of the optimizer steps and evaluations run by this process (not by earlier, resumed parts)."""

    start: float = field(default_factory=time.perf_counter)
    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0  # the latest validation pass

    def add_step(self, seconds: float) -> None:
        self.step_seconds.append(seconds)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    def tokens_per_second(self, batch_tokens: int) -> float | None:
        seconds = sum(self.step_seconds)
        return self.steps * batch_tokens / seconds if seconds else None

    def next_step_passes(self, time_limit: float) -> bool:
        """Whether the next step, at the median step time so far, would end past ``time_limit`` (0: none)."""
        next_step = _upper_median(self.step_seconds) if self.step_seconds else 0.0
        return time_limit > 0 and time.perf_counter() - self.start + next_step > time_limit

    def fitted_total_steps(self, config: TrainConfig, step: int, total_steps: int) -> int:
        """A schedule length that ends within ``config.time_limit`` (at most the config's), from ``step`` on."""
        # The first step is left out: it pays for one-time allocations and warm-up.
        step_seconds = _upper_median(self.step_seconds[1:][-20:])
        remaining = config.time_limit - (time.perf_counter() - self.start)
        # Reserve the final evaluations and the save: about three periodic evaluations' worth, plus 5 %.
        remaining = remaining * 0.95 - 3 * self.eval_seconds
        per_step = step_seconds + (self.eval_seconds / config.eval_interval if config.eval_interval else 0.0)
        fitted = min(config.total_steps, step + max(1, int(remaining / per_step)))
        if abs(fitted - total_steps) > 0.01 * total_steps:
            logger.info(
                "fit_to_time_limit: %.2fs/step, %.1fs/eval -> schedule of %d steps (was %d)",
                step_seconds,
                self.eval_seconds,
                fitted,
                total_steps,
            )
        return fitted
