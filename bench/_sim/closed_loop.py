"""The real closed-loop check: the simulator's prediction for one short trace, to hold a live run against.

A live run (the local runtime: real Redis, the real operator, real `celery worker` processes)
replays the same trace with Celery's own `apply_async` and measures each task's wait; this module
says what the simulation predicts for that run and whether the two agree within a tolerance.

    trace = closed_loop_trace()
    write_trace(trace, path)                      # the live producer replays this file
    prediction = predict_waits(trace, CLOSED_LOOP_TIER, startup_delay=(lo, hi))  # measured start-up
    agreement = compare_waits(prediction, measured_waits, live_peak_replicas=peak)
    assert agreement.ok, agreement.report()

Why this tolerance (``Tolerance()``: p50 and p95 within max(2 s, 25 %), peak replicas within 1):
the simulation leaves out the live loop's latencies, each small against waits of ~5-20 s but
adding up: the operator's poll phase (0-1 s), the apiserver write and the local runtime noticing
the new spec.replicas (~0.1-1 s), start-up jitter beyond the measured range on a 2-core laptop
(~1 s), Celery's per-task dispatch cost (BRPOP wake-up, ack, pool hand-off: ~5-20 ms a task, which
compounds down a queue of 100+), and the producer's own send rate. 2 s absorbs the fixed latencies;
25 % absorbs the per-task costs that grow with queue position. A wrong model (a missing in-flight
count, priority lists drained in the wrong order, a start-up delay off by a factor) moves p95 by
far more than that, so the check can still fail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from celery_fleet.api.models import Autoscaling, ReplicaBounds, Tier

from .engine import FleetParams, SimResult, percentile, simulate
from .scalers import OperatorScaler
from .traces import Durations, Task, Trace, step_burst

__all__ = [
    "CLOSED_LOOP_TIER",
    "Agreement",
    "Prediction",
    "Tolerance",
    "closed_loop_trace",
    "compare_waits",
    "predict_waits",
    "read_trace",
    "write_trace",
]

# Small enough for real processes on a 2-core laptop: thread pools (the tasks sleep), 1-6 pods.
CLOSED_LOOP_TIER = Tier(
    name="high",
    queues=["high_priority"],
    concurrency=4,
    pool="threads",
    replicas=ReplicaBounds(min=1, max=6),
    autoscaling=Autoscaling(),
)


def closed_loop_trace(seed: int = 1) -> Trace:
    """The step burst, shortened: 150 tasks (half prioritised) at t=10 s, sleeps of ~1 s, 150 s long."""
    return step_burst(
        seed,
        name="closed-loop",
        burst_size=150,
        at=10.0,
        spread=1.0,
        background_rate=0.2,
        horizon=150.0,
        prioritised_fraction=0.5,
        durations=Durations(median=1.0, sigma=0.5, cap=10.0),
    )


def write_trace(trace: Trace, path: Path) -> None:
    """JSON lines: a header, then one task a line: {"id", "at", "priority", "duration"} (seconds)."""
    lines = [json.dumps({"name": trace.name, "description": trace.description, "horizon": trace.horizon})]
    lines += [
        json.dumps({"id": t.id, "at": t.arrival, "priority": t.priority, "duration": round(t.duration, 6)})
        for t in trace.tasks
    ]
    path.write_text("\n".join(lines) + "\n")


def read_trace(path: Path) -> Trace:
    header, *rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    tasks = tuple(Task(id=r["id"], arrival=r["at"], priority=r["priority"], duration=r["duration"]) for r in rows)
    return Trace(name=header["name"], description=header["description"], tasks=tasks, horizon=header["horizon"])


@dataclass(frozen=True)
class Prediction:
    waits: dict[int, float]  # task id -> seconds from enqueue to start
    replicas: tuple[tuple[float, int], ...]  # (t, spec.replicas) at every change, first entry at t=0
    peak_replicas: int
    worker_seconds: float
    result: SimResult


def predict_waits(
    trace: Trace,
    tier: Tier = CLOSED_LOOP_TIER,
    *,
    startup_delay: tuple[float, float],
    poll_interval: float = 1.0,
    poll_phase: float = 0.5,
    dt: float = 0.05,
    initial_replicas: int | None = None,
    seed: int = 0,
) -> Prediction:
    """What the simulation predicts for ``trace`` run by the operator's real ``decide`` on ``tier``.

    ``startup_delay``: the live runtime's measured range, from the Deployment's spec.replicas change
    to the new worker's ``worker_ready`` (so it includes the local runtime's reaction time).
    """
    params = FleetParams.for_tier(tier, initial_replicas=initial_replicas, startup_delay=startup_delay, dt=dt)
    result = simulate(trace, OperatorScaler(tier, poll_interval=poll_interval, phase=poll_phase), params, seed=seed)
    changes: list[tuple[float, int]] = [(0.0, params.initial_replicas)]
    for t, n in zip(result.samples.t, result.samples.spec_replicas, strict=True):
        if n != changes[-1][1]:
            changes.append((t, n))
    return Prediction(
        waits={t.id: w for t, w in zip(trace.tasks, result.waits, strict=True)},
        replicas=tuple(changes),
        peak_replicas=result.peak_replicas,
        worker_seconds=result.worker_seconds,
        result=result,
    )


@dataclass(frozen=True)
class Tolerance:
    absolute: float = 2.0  # seconds
    relative: float = 0.25  # of the simulated value
    percentiles: tuple[float, ...] = (50.0, 95.0)
    replicas: int = 1  # peak replicas may differ by this much

    def allowed(self, simulated: float) -> float:
        return max(self.absolute, self.relative * abs(simulated))


@dataclass(frozen=True)
class Check:
    metric: str
    simulated: float
    measured: float
    allowed: float

    @property
    def ok(self) -> bool:
        return abs(self.measured - self.simulated) <= self.allowed


@dataclass(frozen=True)
class Agreement:
    checks: tuple[Check, ...]
    missing: tuple[int, ...]  # task ids the live run never reported as started
    unknown: tuple[int, ...]  # task ids the live run reported that the trace does not have

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unknown and all(c.ok for c in self.checks)

    def report(self) -> str:
        lines = [
            f"{c.metric}: simulated {c.simulated:.2f}, measured {c.measured:.2f}, "
            f"allowed +-{c.allowed:.2f} -> {'ok' if c.ok else 'OUT OF TOLERANCE'}"
            for c in self.checks
        ]
        if self.missing:
            lines.append(f"{len(self.missing)} tasks never reported a start (first ids: {list(self.missing[:5])})")
        if self.unknown:
            lines.append(
                f"{len(self.unknown)} reported tasks are not in the trace (first ids: {list(self.unknown[:5])})"
            )
        return "\n".join(lines)


def compare_waits(
    prediction: Prediction,
    measured: Mapping[int, float],
    *,
    live_peak_replicas: int | None = None,
    tolerance: Tolerance | None = None,
) -> Agreement:
    """Hold measured waits (task id -> seconds from enqueue to start) against the prediction."""
    tol = tolerance or Tolerance()
    missing = tuple(sorted(set(prediction.waits) - set(measured)))
    unknown = tuple(sorted(set(measured) - set(prediction.waits)))
    sim = [prediction.waits[i] for i in sorted(prediction.waits)]
    live = [w for i, w in sorted(measured.items()) if i in prediction.waits and math.isfinite(w)]
    checks = []
    for q in tol.percentiles:
        s, m = percentile(sim, q), percentile(live, q)
        checks.append(Check(f"p{q:g} wait (s)", s, m, tol.allowed(s)))
    if live_peak_replicas is not None:
        checks.append(Check("peak replicas", prediction.peak_replicas, live_peak_replicas, float(tol.replicas)))
    return Agreement(checks=tuple(checks), missing=missing, unknown=unknown)
