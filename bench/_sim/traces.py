"""Task traces: when each task lands in Redis, with which Celery priority, and how long it runs.

A trace is generated once per seed and replayed unchanged against every autoscaler, so the
autoscalers see exactly the same tasks (same arrivals, priorities and durations).
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_PRIORITY_STEPS",
    "Durations",
    "Task",
    "Trace",
    "diurnal",
    "drift",
    "poisson_bursts",
    "priority_step",
    "read_csv_startups",
    "read_csv_trace",
    "step_burst",
    "write_csv_trace",
]

# kombu's Redis transport default `priority_steps`; step 0 is the bare queue name.
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
# What a producer sets on a prioritised message; each lands in its own sub-list (steps 3, 6, 9).
PRIORITISED = (3, 6, 9)


@dataclass(frozen=True, slots=True)
class Task:
    id: int
    arrival: float  # seconds from trace start when the producer's LPUSH lands
    priority: int  # Celery message priority (0-9) as the producer set it
    duration: float  # seconds the task runs once a worker process starts it


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    tasks: tuple[Task, ...]  # sorted by arrival
    horizon: float  # seconds simulated, the window over which cost is compared

    @property
    def prioritised_fraction(self) -> float:
        if not self.tasks:
            return 0.0
        return sum(1 for t in self.tasks if t.priority > 0) / len(self.tasks)


@dataclass(frozen=True)
class Durations:
    """Lognormal task run times given by their median and log-space sigma, capped like a time limit."""

    median: float = 2.0
    sigma: float = 0.8
    cap: float = 60.0

    @property
    def mean(self) -> float:
        return min(self.cap, self.median * math.exp(self.sigma**2 / 2))

    def draw(self, rng: random.Random) -> float:
        return min(self.cap, rng.lognormvariate(math.log(self.median), self.sigma))


def priority_step(priority: int, steps: Sequence[int] = DEFAULT_PRIORITY_STEPS) -> int:
    """The sub-list a message of this priority lands in (kombu: the highest step <= priority)."""
    clamped = max(0, min(9, priority))
    return steps[max(0, bisect.bisect(steps, clamped) - 1)]


def _priority(rng: random.Random, prioritised_fraction: float) -> int:
    return rng.choice(PRIORITISED) if rng.random() < prioritised_fraction else 0


def _build(
    name: str,
    description: str,
    arrivals: list[float],
    rng: random.Random,
    durations: Durations,
    prioritised_fraction: float,
    horizon: float,
) -> Trace:
    arrivals.sort()
    tasks = tuple(
        Task(id=i, arrival=round(a, 6), priority=_priority(rng, prioritised_fraction), duration=durations.draw(rng))
        for i, a in enumerate(arrivals)
    )
    return Trace(name=name, description=description, tasks=tasks, horizon=horizon)


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    out: list[float] = []
    if rate <= 0:
        return out
    t = start + rng.expovariate(rate)
    while t < end:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def step_burst(
    seed: int,
    *,
    name: str = "step-burst",
    burst_size: int = 600,
    at: float = 60.0,
    spread: float = 2.0,
    background_rate: float = 0.5,
    horizon: float = 900.0,
    prioritised_fraction: float = 0.5,
    durations: Durations | None = None,
) -> Trace:
    """A quiet background, then ``burst_size`` tasks sent within ``spread`` seconds at ``at``."""
    rng = random.Random(f"step-burst/{seed}")
    arrivals = _poisson(rng, background_rate, 0.0, horizon)
    arrivals += [at + rng.uniform(0.0, spread) for _ in range(burst_size)]
    desc = (
        f"{burst_size} tasks within {spread:g}s at t={at:g}s over a Poisson background of "
        f"{background_rate:g}/s; {prioritised_fraction:.0%} prioritised"
    )
    return _build(name, desc, arrivals, rng, durations or Durations(), prioritised_fraction, horizon)


def poisson_bursts(
    seed: int,
    *,
    name: str = "poisson-bursts",
    mean_gap: float = 150.0,
    size_range: tuple[int, int] = (40, 240),
    spread: float = 5.0,
    background_rate: float = 0.5,
    horizon: float = 1800.0,
    quiet_tail: float = 300.0,
    prioritised_fraction: float = 0.5,
    durations: Durations | None = None,
) -> Trace:
    """Bursts whose start times form a Poisson process (mean gap ``mean_gap``), uniform sizes."""
    rng = random.Random(f"poisson-bursts/{seed}")
    arrivals = _poisson(rng, background_rate, 0.0, horizon)
    starts = _poisson(rng, 1.0 / mean_gap, 0.0, horizon - quiet_tail)
    for s in starts:
        arrivals += [s + rng.uniform(0.0, spread) for _ in range(rng.randint(*size_range))]
    desc = (
        f"bursts of {size_range[0]}-{size_range[1]} tasks (within {spread:g}s) arriving as a Poisson "
        f"process, mean gap {mean_gap:g}s, over {background_rate:g}/s background; "
        f"{prioritised_fraction:.0%} prioritised"
    )
    return _build(name, desc, arrivals, rng, durations or Durations(), prioritised_fraction, horizon)


def diurnal(
    seed: int,
    *,
    name: str = "diurnal",
    base_rate: float = 0.5,
    peak_rate: float = 8.0,
    period: float = 1800.0,
    horizon: float = 1800.0,
    prioritised_fraction: float = 0.5,
    durations: Durations | None = None,
) -> Trace:
    """A day compressed into ``period`` seconds: the rate follows a raised cosine, trough at t=0."""
    rng = random.Random(f"diurnal/{seed}")

    def rate(t: float) -> float:
        return base_rate + (peak_rate - base_rate) * (1 - math.cos(2 * math.pi * t / period)) / 2

    # Non-homogeneous Poisson arrivals by thinning a homogeneous process at the peak rate.
    arrivals = [t for t in _poisson(rng, peak_rate, 0.0, horizon) if rng.random() * peak_rate < rate(t)]
    desc = (
        f"a day compressed into {period:g}s: Poisson arrivals whose rate swings {base_rate:g} -> "
        f"{peak_rate:g} -> {base_rate:g}/s; {prioritised_fraction:.0%} prioritised"
    )
    return _build(name, desc, arrivals, rng, durations or Durations(), prioritised_fraction, horizon)


def drift(
    seed: int,
    *,
    name: str = "drift",
    rate: float = 3.0,
    change_at: float = 900.0,
    factor: float = 2.0,
    horizon: float = 1800.0,
    prioritised_fraction: float = 0.5,
    durations: Durations | None = None,
) -> Trace:
    """Steady Poisson arrivals whose task run times are multiplied by ``factor`` from ``change_at``."""
    rng = random.Random(f"drift/{seed}")
    d = durations or Durations()
    arrivals = sorted(_poisson(rng, rate, 0.0, horizon))
    tasks = tuple(
        Task(
            id=i,
            arrival=round(a, 6),
            priority=_priority(rng, prioritised_fraction),
            duration=min(d.cap, d.draw(rng) * (factor if a >= change_at else 1.0)),
        )
        for i, a in enumerate(arrivals)
    )
    desc = (
        f"Poisson arrivals at {rate:g}/s; task run times x{factor:g} from t={change_at:g}s; "
        f"{prioritised_fraction:.0%} prioritised"
    )
    return Trace(name=name, description=desc, tasks=tasks, horizon=horizon)


def write_csv_trace(trace: Trace, path: Path) -> None:
    """CSV with a header: ``arrival,priority,duration`` (seconds from the trace's start), one task a row."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival", "priority", "duration"])
        w.writerows([f"{t.arrival:.6f}", t.priority, f"{t.duration:.6f}"] for t in trace.tasks)


def read_csv_trace(path: Path, *, name: str | None = None, horizon: float | None = None) -> Trace:
    """A trace from ``arrival,priority,duration`` rows (header required; any order, sorted here).

    The horizon defaults to the last arrival; rows with a negative time or a priority outside 0-9 are refused.
    """
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    parsed = []
    for n, r in enumerate(rows, start=2):
        try:
            arrival, priority, duration = float(r["arrival"]), int(r["priority"]), float(r["duration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: want arrival,priority,duration numbers ({exc})") from None
        if arrival < 0 or duration < 0 or not 0 <= priority <= 9:
            raise ValueError(f"{path}:{n}: negative time or priority outside 0-9")
        parsed.append((arrival, priority, duration))
    parsed.sort()
    tasks = tuple(Task(id=i, arrival=a, priority=p, duration=d) for i, (a, p, d) in enumerate(parsed))
    end = horizon if horizon is not None else (tasks[-1].arrival if tasks else 0.0)
    return Trace(name=name or path.stem, description=f"replayed from {path.name}", tasks=tasks, horizon=end)


def read_csv_startups(path: Path) -> tuple[float, ...]:
    """Pod start-up times (seconds), one a row under a ``startup`` header: the n-th pod created gets the n-th."""
    with path.open(newline="") as f:
        values = tuple(float(r["startup"]) for r in csv.DictReader(f))
    if not values or any(v < 0 for v in values):
        raise ValueError(f"{path}: want at least one non-negative startup")
    return values
