"""The scaling Events the operator writes for a run's decisions, without and with Event series.

Before issue 16.8 every scaling change was a new Event object. Now `post_event` counts a repeat of the
same Event (object, type, reason, message) within `SERIES_WINDOW` on the Event already written (a
PATCH of count and lastTimestamp). The rule is `celery_fleet.kube.events.EventSeries`, replayed here
as is; the reason per direction is the one `handlers/autoscaler/pool.py` posts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from celery_fleet.kube.events import EventSeries, ObjectRef, series_key
from celery_fleet.planning.scaling import Decision, Direction

__all__ = ["ScalingEvents", "scaling_events"]

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # sim time 0; only differences matter
_POOL = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", "sim", "sim", "sim-uid")


@dataclass(frozen=True)
class ScalingEvents:
    changes: int  # scaling decisions that changed replicas: one Event object each before
    created: int  # Event objects written with series (POST)
    counted: int  # repeats counted on an Event already written (PATCH of count)
    seconds: float  # simulated time the decisions span (the run's end)

    def per_hour(self, n: int) -> float:
        return n * 3600.0 / self.seconds if self.seconds > 0 else float("nan")


def scaling_events(decisions: Sequence[tuple[float, Decision]], seconds: float) -> ScalingEvents:
    """`decisions`: (sim time, decision) of every change, as `OperatorScaler.decisions` keeps them."""
    series = EventSeries()
    created = counted = 0
    for at, d in decisions:
        reason = "ScaledUp" if d.direction is Direction.UP else "ScaledDown"
        key = series_key(_POOL, reason, d.message, "Normal")
        now = _EPOCH + dt.timedelta(seconds=at)
        if series.repeat_of(key, now) is None:
            series.started(key, f"event-{created}", now)
            created += 1
        else:
            counted += 1
    return ScalingEvents(changes=len(decisions), created=created, counted=counted, seconds=seconds)
