"""The real closed-loop check: the simulator's prediction for one short trace, to hold a live run against.

A live run (the local runtime: real Redis, the real operator, real `celery worker` processes)
replays the same trace with Celery's own `apply_async` and measures each task's wait; this module
says what the simulation predicts for that run and whether the two agree within a tolerance.

    trace = closed_loop_trace()
    write_trace(trace, path)                      # the live producer replays this file
    prediction = predict_waits(trace, CLOSED_LOOP_TIER, startup_delay=(lo, hi))  # measured start-up
    agreement = compare_waits(prediction, measured_waits, live_peak_replicas=peak, live_worker_seconds=ws)
    assert agreement.ok, agreement.report()

What the live side supplies: a pool whose one tier is ``CLOSED_LOOP_TIER`` (operator poll 1 s),
scaled to replicas.min with its worker ready before t=0; a producer that sends task ``id`` at
``t0 + at`` with ``apply_async(queue=tier.queues[0], priority=priority)`` to a task that sleeps
``duration`` s, recording the send time; the task's start time (first line of the task, or
``task_prerun``), so wait = start - send per id; per worker process, the time its Deployment's
spec.replicas asked for it and its ``worker_ready`` (the range is ``startup_delay``), and its
exit (warm shutdown included) for worker-seconds over [t0, t0 + prediction.result.end]; the peak
spec.replicas.

Why this tolerance (``Tolerance()``: p50 and p95 wait within max(2 s, 25 %) of the prediction,
peak replicas within 1, worker-seconds within 25 % when measured): the simulation leaves out the
live loop's latencies, each small against waits of ~5-15 s but adding up: the operator's poll
phase (0-1 s), the apiserver write and the local runtime noticing the new spec.replicas (~0.1-1 s),
start-up jitter beyond the measured range on a busy 2-core laptop (~1 s), Celery's per-task cost
(BRPOP wake-up, ack, pool hand-off: ~5-20 ms a task, compounding down the queue) and the
producer's own send rate. 2 s absorbs the fixed latencies, 25 % the costs that grow with queue
position. `bench/autoscale_sim.py` shows each of these moving the prediction by well under the
tolerance, and model errors (start-up off by a factor, priority sub-lists not read, decisions at
an HPA's 15 s pace) moving it by more, so the check can fail.
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
from .view import Autoscaler

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

# Small enough for real processes on a 2-core laptop: thread pools (the tasks sleep), 1-8 pods.
CLOSED_LOOP_TIER = Tier(
    name="high",
    queues=["high_priority"],
    concurrency=4,
    pool="threads",
    replicas=ReplicaBounds(min=1, max=8),
    autoscaling=Autoscaling(),
)


def closed_loop_trace(seed: int = 1) -> Trace:
    """The step burst, shortened: 60 tasks (half prioritised) at t=10 s, sleeps of ~2 s, 150 s long.

    60 queued at a target of 10 per replica wants 6 of the tier's 8 pods: the replica count comes
    from the decision, not from replicas.max, so a run that reads depth wrongly shows it.
    """
    return step_burst(
        seed,
        name="closed-loop",
        burst_size=60,
        at=10.0,
        spread=1.0,
        background_rate=0.1,
        horizon=150.0,
        prioritised_fraction=0.5,
        durations=Durations(median=2.0, sigma=0.5, cap=10.0),
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
    scaler: Autoscaler | None = None,
) -> Prediction:
    """What the simulation predicts for ``trace`` run by the operator's real ``decide`` on ``tier``.

    ``startup_delay``: the live runtime's measured range, from the Deployment's spec.replicas change
    to the new worker's ``worker_ready`` (so it includes the local runtime's reaction time).
    ``scaler`` replaces the operator's decision (to show what a wrong model would predict).
    """
    params = FleetParams.for_tier(
        tier, initial_replicas=initial_replicas, startup_delay=startup_delay, dt=dt, scale_in="idle-first"
    )
    scaler = scaler or OperatorScaler(tier, poll_interval=poll_interval, phase=poll_phase)
    result = simulate(trace, scaler, params, seed=seed)
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
    worker_seconds: float = 0.25  # relative

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
    live_worker_seconds: float | None = None,
    tolerance: Tolerance | None = None,
) -> Agreement:
    """Hold measured waits (task id -> seconds from enqueue to start) against the prediction.

    ``live_worker_seconds``: the sum of the live workers' lifetimes (process start to exit) over
    the same span as the prediction (``prediction.result.end`` seconds from the trace's t=0).
    """
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
    if live_worker_seconds is not None:
        ws = prediction.worker_seconds
        checks.append(Check("worker-seconds", ws, live_worker_seconds, tol.worker_seconds * ws))
    return Agreement(checks=tuple(checks), missing=missing, unknown=unknown)
