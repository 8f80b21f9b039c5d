"""What a wait target needs to know, estimated from what the autoscaler sees each poll (pure, no clock).

Three estimates, each an immutable value the caller keeps between polls (in ``TierHistory``):

* :class:`ArrivalRate`: tasks per second and the index of dispersion of the counts per poll (the
  arrivals' ``ca^2`` in the queueing formulas), from per-poll arrival counts;
* :class:`ServiceTime`: the run-time distribution, not only its mean: decayed first and second
  moments (mean, SCV) and a decayed log-histogram (quantiles);
* :class:`StartUp`: seconds from a pod's creation to its worker consuming.

All decay with time (half-lives below) so they follow drift: a task time that doubles moves the
mean most of the way within two half-lives. :func:`completions` turns two successive readings of
kombu's ``unacked_index`` (delivery tag -> delivery time) into run-time samples and a completion
count; arrivals then follow from conservation: arrived = d(queued) + d(in flight) + completed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

__all__ = [
    "ARRIVAL_HALF_LIFE",
    "SERVICE_HALF_LIFE",
    "STARTUP_HALF_LIFE",
    "ArrivalRate",
    "Completions",
    "ServiceTime",
    "StartUp",
    "WaitEstimates",
    "completions",
]

# Half-lives in seconds. Arrivals and run times: short enough that a doubling is followed within a
# few pod start-ups (10-20 s), long enough to hold dozens of samples at a few tasks per second.
ARRIVAL_HALF_LIFE = 20.0
SERVICE_HALF_LIFE = 20.0
STARTUP_HALF_LIFE = 900.0  # pods start rarely; one slow start should not double the estimate

# Log-spaced histogram: 4 buckets per doubling from 10 ms, 100 buckets (up to ~ 3.5 days).
_H_BASE = 0.01
_H_PER_DOUBLING = 4
_H_BUCKETS = 100


def _decay(since: float | None, now: float, half_life: float) -> float:
    if since is None or now <= since:
        return 1.0
    return float(0.5 ** ((now - since) / half_life))


@dataclass(frozen=True)
class ArrivalRate:
    """Decayed sums over polls of the arrival count ``n`` in each poll interval ``dt``."""

    at: float | None = None
    seconds: float = 0.0  # sum w dt
    count: float = 0.0  # sum w n
    n_sq: float = 0.0  # sum w n^2
    n_dt: float = 0.0  # sum w n dt
    dt_sq: float = 0.0  # sum w dt^2
    half_life: float = ARRIVAL_HALF_LIFE

    def observe(self, now: float, arrived: float, dt: float) -> ArrivalRate:
        """Count ``arrived`` tasks over ``dt`` seconds; a burst far above the rate is clipped.

        The clip (twice the expected count, or 4 standard deviations above it) keeps a burst out of
        the steady rate and its dispersion: the queued burst is the backlog rule's to drain, and a
        rate that doubles per poll still passes whole.
        """
        if dt <= 0 or not math.isfinite(arrived):
            return self
        k = _decay(self.at, now, self.half_life)
        n = max(0.0, arrived)
        if self.seconds > 0:
            expected = self.rate * dt
            n = min(n, max(2 * expected, expected + 4 * math.sqrt(expected) + 2))
        return replace(
            self,
            at=now,
            seconds=self.seconds * k + dt,
            count=self.count * k + n,
            n_sq=self.n_sq * k + n * n,
            n_dt=self.n_dt * k + n * dt,
            dt_sq=self.dt_sq * k + dt * dt,
        )

    @property
    def known(self) -> bool:
        return self.seconds > 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def ca2(self) -> float:
        """Index of dispersion of the per-poll counts, sum (n - r dt)^2 / sum r dt (1 for Poisson),
        clamped to [0.25, 16]: bursts within a poll raise it, the backlog rule covers longer ones."""
        r = self.rate
        if r <= 0:
            return 1.0
        idc = (self.n_sq - 2 * r * self.n_dt + r * r * self.dt_sq) / (r * self.seconds)
        return max(0.25, min(16.0, idc))


def _bucket(x: float) -> int:
    if x <= _H_BASE:
        return 0
    return min(_H_BUCKETS - 1, int(math.log2(x / _H_BASE) * _H_PER_DOUBLING) + 1)


def _bucket_upper(i: int) -> float:
    return float(_H_BASE * 2 ** (i / _H_PER_DOUBLING))


@dataclass(frozen=True)
class ServiceTime:
    """Decayed moments and log-histogram of task run times (seconds); samples may carry weights."""

    at: float | None = None
    weight: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0
    buckets: tuple[float, ...] = ()
    half_life: float = SERVICE_HALF_LIFE

    def observe(self, now: float, samples: Sequence[tuple[float, float]]) -> ServiceTime:
        """``samples``: (seconds, weight) pairs; the state decays to ``now`` first."""
        k = _decay(self.at, now, self.half_life)
        hist = [b * k for b in self.buckets] if self.buckets else [0.0] * _H_BUCKETS
        w, s, s2 = self.weight * k, self.total * k, self.total_sq * k
        for x, wt in samples:
            if not (x >= 0 and wt > 0 and math.isfinite(x) and math.isfinite(wt)):
                continue  # a corrupt reading is skipped, never fatal
            w += wt
            s += wt * x
            s2 += wt * x * x
            hist[_bucket(x)] += wt
        return replace(self, at=now, weight=w, total=s, total_sq=s2, buckets=tuple(hist))

    @property
    def known(self) -> bool:
        return self.weight >= 1.0  # one whole (decayed) sample at least

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else 0.0

    @property
    def scv(self) -> float:
        """Squared coefficient of variation: variance / mean^2 (1 for exponential run times)."""
        m = self.mean
        if m <= 0:
            return 1.0
        var = max(0.0, self.total_sq / self.weight - m * m)
        return var / (m * m)

    def quantile(self, q: float) -> float:
        """The q-quantile (0-1), to the bucket's upper edge (within 19 % above)."""
        if not self.buckets or self.weight <= 0:
            return 0.0
        goal, acc = q * sum(self.buckets), 0.0
        for i, b in enumerate(self.buckets):
            acc += b
            if acc >= goal and b > 0:
                return _bucket_upper(i)
        return _bucket_upper(_H_BUCKETS - 1)


@dataclass(frozen=True)
class StartUp:
    """Decayed mean and variance of pod start-up times (created -> consuming)."""

    at: float | None = None
    weight: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0
    half_life: float = STARTUP_HALF_LIFE

    def observe(self, now: float, seconds: Sequence[float]) -> StartUp:
        if not seconds:
            return self
        k = _decay(self.at, now, self.half_life)
        w, s, s2 = self.weight * k, self.total * k, self.total_sq * k
        for x in seconds:
            if x >= 0 and math.isfinite(x):
                w, s, s2 = w + 1, s + x, s2 + x * x
        return replace(self, at=now, weight=w, total=s, total_sq=s2)

    @property
    def known(self) -> bool:
        return self.weight > 0

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else 0.0

    @property
    def planning(self) -> float:
        """Mean + one standard deviation: a pod ordered now is consuming by then about 5 times in 6."""
        m = self.mean
        sd = math.sqrt(max(0.0, self.total_sq / self.weight - m * m)) if self.weight > 0 else 0.0
        return m + sd


@dataclass(frozen=True)
class Completions:
    """What two successive readings of the in-flight entries say about the interval between them."""

    samples: tuple[tuple[float, float], ...]  # (run time, weight) per entry gone
    completed: float  # estimated completions, those never seen included (the weights' sum)


def completions(before: Mapping[str, float], after: Mapping[str, float], before_at: float, now: float) -> Completions:
    """Entries of ``before`` (delivery tag -> delivery time) missing from ``after`` finished in
    (before_at, now]: run time ~ midpoint - delivery time.

    A task of run time d is in at least one reading with probability min(1, d / poll): short tasks
    are under-sampled, so each sample weighs max(1, poll / d) (inverse probability), which also
    counts the completions no reading saw.
    """
    poll = max(now - before_at, 1e-6)
    mid = before_at + poll / 2
    out: list[tuple[float, float]] = []
    for tag, delivered in before.items():
        if tag in after:
            continue
        d = max(mid - delivered, poll / 2, 1e-3)
        out.append((d, max(1.0, poll / d)))
    return Completions(samples=tuple(out), completed=sum(w for _, w in out))


# Kept between polls: at most this many in-flight entries (delivery tag -> delivery time); beyond it
# the run times come from the first ones only and the completion count from conservation.
MAX_TRACKED = 4096
MIN_INTERVAL = 0.5  # seconds between the readings the rates are taken over


@dataclass(frozen=True)
class WaitEstimates:
    """Every estimate of one tier, and the last reading they were advanced from."""

    arrivals: ArrivalRate = ArrivalRate()
    service: ServiceTime = ServiceTime()
    startup: StartUp = StartUp()
    at: float | None = None
    queued: int = 0
    in_flight: int = 0
    delivered: tuple[tuple[str, float], ...] = ()  # (tag, delivery time on the caller's clock)
    replicas: int | None = None  # the Deployment's spec.replicas at the last poll
    polled_at: float | None = None  # the last poll, with or without ages
    # Scale-ups not yet ready: (when spec.replicas was raised, the ready count that completes it).
    ordered: tuple[tuple[float, int], ...] = ()

    def observe(
        self,
        now: float,
        queued: int,
        in_flight: int,
        ages: Mapping[str, float] | None,
        startups: Sequence[float] = (),
        *,
        replicas: int | None = None,
        ready: int | None = None,
    ) -> WaitEstimates:
        """Advance to a new poll. ``ages``: seconds since delivery of each in-flight entry (kombu's
        ``unacked_index``, read against the broker's clock), None when the poll did not read them.
        ``startups``: start-ups measured elsewhere; ``replicas`` / ``ready``: the Deployment's spec and
        ready counts, from which start-ups are measured here (raise -> ready, within a poll)."""
        ordered, measured = self._ordered(now, replicas, ready)
        startup = self.startup.observe(now, (*startups, *measured))
        if ages is None or (self.at is not None and now - self.at < MIN_INTERVAL):
            # Too close to the last reading for a rate (a decision taken again after a census), or this
            # poll did not walk the index (the walk's Redis-time budget, a partial walk): the next
            # one that does covers the whole interval, from the last reading kept here.
            return replace(self, startup=startup, replicas=replicas, ordered=ordered, polled_at=now)
        seen = {t: now - max(0.0, a) for t, a in list(ages.items())[:MAX_TRACKED]}
        if self.at is None or now <= self.at:
            first = replace(self, at=now, queued=queued, in_flight=in_flight, delivered=tuple(seen.items()))
            return replace(first, startup=startup, replicas=replicas, ordered=ordered, polled_at=now)
        dt = now - self.at
        done = completions(dict(self.delivered), seen, self.at, now)
        arrived = (queued - self.queued) + (in_flight - self.in_flight) + done.completed
        return replace(
            self,
            arrivals=self.arrivals.observe(now, arrived, dt),
            service=self.service.observe(now, done.samples),
            startup=startup,
            at=now,
            queued=queued,
            in_flight=in_flight,
            delivered=tuple(seen.items()),
            replicas=replicas,
            ordered=ordered,
            polled_at=now,
        )

    def _ordered(
        self, now: float, replicas: int | None, ready: int | None
    ) -> tuple[tuple[tuple[float, int], ...], tuple[float, ...]]:
        """Pending scale-ups after this poll, and the start-ups they completed."""
        pending = list(self.ordered)
        if (
            replicas is not None
            and self.replicas is not None
            and replicas > self.replicas
            and self.polled_at is not None
        ):
            pending.append((self.polled_at, replicas))  # raised by the decision of the last poll
        if replicas is not None:
            pending = [(t, n) for t, n in pending if n <= replicas]  # lowered since: never completes
        measured = tuple(now - t for t, n in pending if ready is not None and ready >= n)
        left = tuple((t, n) for t, n in pending if ready is None or ready < n)
        return left[-16:], measured  # bounded: the most recent scale-ups
