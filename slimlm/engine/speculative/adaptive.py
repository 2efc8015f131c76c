"""How many tokens to propose this step: the K with the best predicted speedup, or 0 (plain decode).

Cost model, per batch-size bucket b (decode steps only)::

    speedup(k) = E[tokens per sequence-step](k) / (t(b, k) / t(b, 0))
    E(k)       = 1 + c * (a + a^2 + ... + a^k)    (= (1 - a^(k+1)) / (1 - a) when c = 1)

where a is the running acceptance rate of one proposal given the ones before it were accepted, c the running
share of the k asked-for proposals that the proposer actually made (prompt lookup may find fewer or none),
and t(b, k) the wall time of a decode step (proposals + verification forward + acceptance) with k proposals
per sequence. t(b, k) / t(b, 0) is the brief's 1 + cost(proposals) / cost(target step) + verify overhead,
measured rather than modelled: t(b, 0) is the median of recent plain steps, and t(b, k) = t(b, 0) + s * k
with s the median over recent speculative steps (any k) of (t - t(b, 0)) / k. Pooling every k into one
slope keeps the estimate well fed whatever k is in use, medians shrug off the steps that a shared machine
makes 10x slower now and then, and s is never taken below 0, so an acceptance of 0 always predicts a
slowdown. A linear cost is pessimistic for memory-bound steps, whose cost hardly grows with the number of
tokens; large batches are compute-bound: there s approaches a plain step and speculation switches off.

A bucket with no measurements yet explores max_k, unless a smaller bucket already measured that speculation
does not pay: then it stays off, without probes of its own, for as long as the smaller bucket says so (see
``_pays_not_below``).

Whatever is not in use is re-measured now and then (every ``probe_interval`` decode steps of a bucket): a
plain step while speculating, a one-token speculation while off (cheap, and enough to measure acceptance),
and a neighbouring k, so the choice follows changes in acceptance and load. The first speculative step
after plain ones is not timed: a draft model spends it catching up on the tokens of the plain steps, a
cost that staying on does not have (so probes while off come in pairs, and the second one is timed).

That catch-up is a real cost of every switch, though, and predictions near 1 are noise. So a bucket that
is off turns on only above ``min_speedup * (1 + switch_margin)`` (and a larger bucket explores only where
a smaller one predicts that much), while one that is on stays on down to ``min_speedup``; and each probe
pair that finds speculation still not paying doubles the bucket's wait before the next (up to
``MAX_PROBE_BACKOFF`` times ``probe_interval``). Measured before these two rules, py-draft at 16 concurrent
requests (predicted 1.01, toggling on and off): 0.87-0.89x of plain decoding.
"""

from __future__ import annotations

from collections import deque

# Step times are medians of the last few: on a shared machine single steps take 10x longer now and then.
COST_WINDOW = 31
# Probes while off wait at most this many probe intervals (the wait doubles after each unfruitful pair).
MAX_PROBE_BACKOFF = 8


def bucket(batch_size: int) -> int:
    return batch_size if batch_size <= 4 else 1 << (batch_size - 1).bit_length()


def expected_tokens(acceptance: float, k: int, coverage: float = 1.0) -> float:
    return 1.0 + coverage * sum(acceptance**i for i in range(1, k + 1))


class _Ewma:
    __slots__ = ("value", "weight")

    def __init__(self, weight: float):
        self.value: float | None = None
        self.weight = weight

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class AdaptiveController:
    def __init__(
        self,
        max_k: int,
        adaptive: bool = True,
        probe_interval: int = 32,
        weight: float = 0.1,
        min_speedup: float = 1.0,
        disable_by_batch_size: int | None = None,
        switch_margin: float = 0.1,
    ):
        self.max_k = max_k
        self.adaptive = adaptive
        self.probe_interval = probe_interval
        self.weight = weight
        self.min_speedup = min_speedup
        self.disable_by_batch_size = disable_by_batch_size
        self.switch_margin = switch_margin
        self._plain: dict[int, deque[float]] = {}  # bucket -> recent plain step times
        self._spec: dict[int, deque[tuple[int, float]]] = {}  # bucket -> recent (k, step time)
        self._accepted = _Ewma(weight)
        self._trials = _Ewma(weight)
        self._proposed = _Ewma(weight)
        self._planned = _Ewma(weight)
        self._decisions: dict[int, int] = {}
        self._recent: dict[int, tuple[int, int]] = {}  # bucket -> (previous k, current k)
        self._off: set[int] = set()  # buckets where measurements switched speculation off
        self._next_probe: dict[int, int] = {}  # bucket -> decision number of its next probe pair while off
        self._backoff: dict[int, int] = {}  # bucket -> current wait between probe pairs, in probe intervals
        self.predicted_speedup: float | None = None

    @property
    def acceptance(self) -> float | None:
        trials = self._trials.value
        return None if not trials else min(1.0, self._accepted.value / trials)

    @property
    def coverage(self) -> float:
        planned = self._planned.value
        return 1.0 if not planned else min(1.0, self._proposed.value / planned)

    def record_cost(self, batch_size: int, k: int, seconds: float) -> None:
        b = bucket(batch_size)
        if k == 0:
            self._plain.setdefault(b, deque(maxlen=COST_WINDOW)).append(seconds)
        elif self._recent.get(b, (k, k))[0] != 0:  # not the first speculative step after plain ones (see above)
            self._spec.setdefault(b, deque(maxlen=COST_WINDOW)).append((k, seconds))

    def record_acceptance(self, planned: int, proposed: int, accepted: int, trials: int) -> None:
        self._planned.add(planned)
        self._proposed.add(proposed)
        self._accepted.add(accepted)
        self._trials.add(trials)

    def _fit(self, b: int) -> tuple[float, float] | None:
        """(t(b, 0), slope) from the recent steps of bucket b; None until both kinds were measured."""
        plain, spec = self._plain.get(b), self._spec.get(b)
        if not plain or not spec:
            return None
        t0 = _median(plain)
        return t0, max(0.0, _median((t - t0) / k for k, t in spec))

    def cost(self, batch_size: int, k: int) -> float | None:
        """Estimated seconds of a decode step with k proposals per sequence (None: not measured yet)."""
        fit = self._fit(bucket(batch_size))
        return None if fit is None else fit[0] + fit[1] * k

    def predict(self, batch_size: int, k: int) -> float | None:
        """Predicted speedup of k proposals per sequence over plain decode at this batch size."""
        fit = self._fit(bucket(batch_size))
        a = self.acceptance
        if fit is None or a is None or fit[0] <= 0:
            return None
        t0, slope = fit
        return expected_tokens(a, k, self.coverage) * t0 / (t0 + slope * k)

    def choose(self, batch_size: int) -> int:
        k = self._choose(batch_size)
        b = bucket(batch_size)
        self._recent[b] = (self._recent.get(b, (k, k))[1], k)
        return k

    def _choose(self, batch_size: int) -> int:
        if self.disable_by_batch_size is not None and batch_size >= self.disable_by_batch_size:
            return 0
        if not self.adaptive:
            return self.max_k
        b = bucket(batch_size)
        n = self._decisions[b] = self._decisions.get(b, 0) + 1
        if not self._plain.get(b):
            return 0  # measure the plain step first
        fit = self._fit(b)
        a = self.acceptance
        if fit is None or a is None:
            if self._pays_not_below(b):
                # Off, without probes: a probe here costs a catch-up prefill per sequence; the smaller bucket's
                # own probes keep re-measuring, and once it pays again this bucket explores.
                return 0
            return self.max_k  # explore
        best_k, best = self._best(fit, a)
        self.predicted_speedup = best
        if best <= self._threshold(b in self._off):
            return self._probe_while_off(b, n)
        self._off.discard(b)
        self._next_probe.pop(b, None)
        self._backoff.pop(b, None)
        phase = n % self.probe_interval
        if phase == 0:
            return 0
        if phase == self.probe_interval // 2:
            up = (n // self.probe_interval) % 2 == 0
            neighbour = best_k + 1 if (up and best_k < self.max_k) or best_k == 1 else best_k - 1
            return max(1, min(self.max_k, neighbour))
        return best_k

    def _threshold(self, off: bool) -> float:
        """The predicted speedup to beat: higher to switch on than to stay on (see the module docstring)."""
        return self.min_speedup * (1.0 + self.switch_margin) if off else self.min_speedup

    def _probe_while_off(self, b: int, n: int) -> int:
        """0, or 1 for the two steps of a probe pair; each pair that follows a switch-off doubles the wait."""
        if b not in self._off:
            self._off.add(b)
            self._backoff[b] = 1
            self._next_probe[b] = (n // self.probe_interval + 1) * self.probe_interval
        due = self._next_probe[b]
        if n == due:
            return 1
        if n == due + 1:
            wait = self._backoff[b] = min(2 * self._backoff[b], MAX_PROBE_BACKOFF)
            self._next_probe[b] = due + wait * self.probe_interval
            return 1
        return 0

    def _best(self, fit: tuple[float, float], acceptance: float) -> tuple[int, float]:
        t0, slope = fit
        c = self.coverage
        speedups = ((k, expected_tokens(acceptance, k, c) * t0 / (t0 + slope * k)) for k in range(1, self.max_k + 1))
        return max(speedups, key=_second)

    def _pays_not_below(self, b: int) -> bool:
        """Whether a smaller batch bucket already measured that speculation does not pay. Acceptance does not
        depend on the batch, and the relative cost of verifying k tokens only grows with it (memory-bound
        steps become compute-bound), so a larger bucket starts switched off instead of exploring max_k: with
        a draft model, that exploration also pays a catch-up prefill of every sequence (measured: 16
        concurrent requests 0.86x of plain decoding with py-draft, most of it there)."""
        a = self.acceptance
        if a is None:
            return False
        fits = (self._fit(smaller) for smaller in self._plain if smaller < b)
        threshold = self._threshold(off=True)
        return any(fit is not None and fit[0] > 0 and self._best(fit, a)[1] <= threshold for fit in fits)


def _second(pair: tuple[int, float]) -> float:
    return pair[1]
