"""Staffing a tier for a queue-wait target (a percentile of enqueue -> start), pure.

``staff(target, load, fleet)`` returns the pods wanted now and why, from the estimates of
``planning.wait_estimators``. Three rules; the tier gets the largest:

* **steady**: the fewest slots ``n`` whose predicted wait percentile meets the target, Erlang C
  (M/M/n) with the Allen-Cunneen correction for non-Poisson arrivals and run times:
  P(W > t) ~ C(n, a) exp(-(n - a) t / (S k)), a = rate x S, k = (ca^2 + cs^2) / 2;
  for large ``a`` this is square-root staffing, n ~ a + beta sqrt(a).
* **backlog** (bursts): the queued messages drain within the time the oldest has left: the slots
  ready now work from now on, new pods only after the start-up time ``T``:
  Q S <= (n0 - a) H + (n - n0) max(H - T, S), H = target - oldest age (at least half the target);
  a start-up longer than the target leaves new pods a run time to help: drain as fast as allowed.
* **busy**: never fewer slots than the messages in flight (the scale-in protocol keeps busy workers).

Delayed turn-off (Gandhi & Harchol-Balter's AutoScale): when start-up is slow, the caller holds the
highest recommendation of the last ``hold_seconds`` (= ``HOLD_STARTUPS`` x start-up) before scaling
down, so load that returns within a start-up finds warm pods instead of paying the start-up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "HOLD_STARTUPS",
    "Fleet",
    "Load",
    "Staffing",
    "StaffingRule",
    "WaitTarget",
    "erlang_c",
    "staff",
    "wait_quantile",
]

# Idle pods are held this many start-ups: holding one costs what restarting it would (ski rental's
# break-even); the simulation (bench/results/wait_target.md) found 2 and 4 cost 10-50 % more for <1 s of p95.
HOLD_STARTUPS = 1.0
_MAX_SLOTS = 100_000


@dataclass(frozen=True)
class WaitTarget:
    seconds: float
    percentile: float = 95.0  # of the queue wait, 50 <= p < 100


@dataclass(frozen=True)
class Load:
    """Estimates (``planning.wait_estimators``) at this poll."""

    rate: float  # tasks/s
    service_mean: float  # s
    service_scv: float = 1.0  # cs^2
    arrival_scv: float = 1.0  # ca^2
    startup: float = 15.0  # s, pod created -> consuming (planning value)


@dataclass(frozen=True)
class Fleet:
    concurrency: int  # slots per pod
    ready_pods: int  # consuming now
    queued: int  # every priority sub-list of the tier's queues
    in_flight: int  # reserved + running
    oldest_age: float | None = None  # of the oldest waiting message, when the poll knows it
    max_pods: int | None = None  # replicas.max: the search for slots stops there


class StaffingRule(StrEnum):
    STEADY = "steady"
    BACKLOG = "backlog"
    BUSY = "busy"
    IDLE = "idle"


@dataclass(frozen=True)
class Staffing:
    pods: int
    rule: StaffingRule
    predicted_wait: float  # the target percentile of the wait at ``pods`` (steady-state model)
    hold_seconds: float  # hold idle pods this long before removal (delayed turn-off)
    reachable: bool  # False: the backlog cannot drain within the target whatever is added
    message: str  # "7 workers for p95 <= 5s at 3.1 tasks/s x 2.6s (cs2 1.9), start-up 12s"


def erlang_c(n: int, a: float) -> float:
    """Probability that an arrival waits in M/M/n with offered load ``a`` (1 when n <= a)."""
    if a <= 0:
        return 0.0
    if n <= a:
        return 1.0
    b = 1.0  # Erlang B by its stable recursion
    for k in range(1, n + 1):
        b = a * b / (k + a * b)
    return n * b / (n - a * (1 - b))


def wait_quantile(n: int, a: float, service_mean: float, k: float, p: float) -> float:
    """The p-th percentile (0-100) of the wait with ``n`` slots; inf when n <= a."""
    if a <= 0:
        return 0.0
    if n <= a:
        return math.inf
    c = erlang_c(n, a)
    tail = 1 - p / 100
    if c <= tail:
        return 0.0
    return service_mean * k / (n - a) * math.log(c / tail)


def _steady_slots(target: WaitTarget, a: float, s: float, k: float, cap: int) -> int:
    """The fewest slots meeting the target, or ``cap`` when more would be needed (O(cap) at most)."""
    if a <= 0:
        return 0
    tail = 1 - target.percentile / 100
    n = max(1, math.floor(a) + 1)
    if n >= cap:
        return cap
    # Erlang B carried along as n grows: O(n) in all.
    b = 1.0
    for j in range(1, n + 1):
        b = a * b / (j + a * b)
    while n < cap:
        c = n * b / (n - a * (1 - b))
        if c <= tail or s * k / (n - a) * math.log(c / tail) <= target.seconds:
            return n
        n += 1
        b = a * b / (n + a * b)
    return n


def staff(target: WaitTarget, load: Load, fleet: Fleet) -> Staffing:
    c = max(1, fleet.concurrency)
    s = max(load.service_mean, 1e-3)
    a = max(0.0, load.rate) * s
    k = max(0.125, (load.arrival_scv + load.service_scv) / 2)
    T = max(0.0, load.startup)
    hold = HOLD_STARTUPS * T

    cap = min(_MAX_SLOTS, fleet.max_pods * c + 1) if fleet.max_pods is not None else _MAX_SLOTS
    steady = _steady_slots(target, a, s, k, cap)
    n0 = fleet.ready_pods * c
    waiting = fleet.queued
    backlog = 0
    reachable = True
    if waiting > 0:
        horizon = target.seconds - (fleet.oldest_age or 0.0)
        horizon = max(horizon, target.seconds / 2)
        late = horizon - T  # what new pods have of the horizon
        reachable = late > 0 or waiting * s <= max(0.0, n0 - a) * horizon
        drained_by_ready = max(0.0, n0 - a) * horizon
        extra = max(0.0, waiting * s - drained_by_ready) / max(late, s)
        backlog = math.ceil(max(n0, a) + extra) if extra > 0 else 0
    busy = fleet.in_flight

    slots = max(steady, backlog, busy)
    rule = StaffingRule.IDLE
    if slots > 0:
        rule = (
            StaffingRule.STEADY if slots == steady else StaffingRule.BACKLOG if slots == backlog else StaffingRule.BUSY
        )
    pods = math.ceil(slots / c)
    predicted = wait_quantile(pods * c, a, s, k, target.percentile)
    p = f"p{target.percentile:g}"
    why = {
        StaffingRule.STEADY: f"for {p} <= {target.seconds:g}s",
        StaffingRule.BACKLOG: f"to drain {waiting} queued within {p} <= {target.seconds:g}s",
        StaffingRule.BUSY: f"for {busy} in flight ({p} <= {target.seconds:g}s needs fewer)",
        StaffingRule.IDLE: f"for {p} <= {target.seconds:g}s: no load",
    }[rule]
    age = f", oldest waiting {fleet.oldest_age:.1f}s" if fleet.oldest_age is not None else ""
    message = (
        f"{pods} workers {why} at {load.rate:.2f} tasks/s x {s:.2f}s (cs2 {load.service_scv:.1f}, "
        f"ca2 {load.arrival_scv:.1f}), start-up {T:.0f}s{age}; predicted {p} "
        + ("inf" if math.isinf(predicted) else f"{predicted:.1f}s")
    )
    if not reachable:
        message += f"; the backlog cannot drain within {target.seconds:g}s with a {T:.0f}s start-up"
    return Staffing(pods, rule, predicted, hold, reachable, message)
