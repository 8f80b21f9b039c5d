"""The Event series rule (kube/events.EventSeries): pure, time as an argument; and the simulation's count of
the scaling Events the operator writes, which replays that rule."""

from __future__ import annotations

import datetime as dt

import pytest
from bench._sim import scaling_events

from celery_fleet.api.models import ReplicaBounds, Tier
from celery_fleet.kube.events import SERIES_WINDOW, EventSeries, ObjectRef, series_key
from celery_fleet.planning.scaling import Observation, TierHistory, decide

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POOL = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", "ns", "shop", "uid-1")
TIER = Tier(name="high", queues=["q"], concurrency=1, replicas=ReplicaBounds(min=1, max=20))
OTHER_POOL = ObjectRef("celeryfleet.io/v1alpha1", "CeleryWorkerPool", "ns", "shop", "uid-2")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_a_repeat_within_the_window_is_counted_on_the_first_event() -> None:
    series = EventSeries()
    key = series_key(POOL, "BrokerUnreachable", "connection refused", "Warning")
    assert series.repeat_of(key, at(0)) is None
    series.started(key, "shop.abc", at(0))
    assert series.repeat_of(key, at(60)) == ("shop.abc", 2)
    # The window runs from the last repeat, as client-go's correlator does.
    assert series.repeat_of(key, at(60 + SERIES_WINDOW.total_seconds() - 1)) == ("shop.abc", 3)


def test_after_the_window_a_new_event_starts() -> None:
    series = EventSeries()
    key = series_key(POOL, "ScaledUp", "Scaled tier high 2 -> 4", "Normal")
    series.started(key, "first", at(0))
    assert series.repeat_of(key, at(SERIES_WINDOW.total_seconds())) is None


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(series_key(POOL, "ScaledUp", "Scaled tier high 2 -> 5", "Normal"), id="message"),
        pytest.param(series_key(POOL, "ScaledDown", "Scaled tier high 2 -> 4", "Normal"), id="reason"),
        pytest.param(series_key(POOL, "ScaledUp", "Scaled tier high 2 -> 4", "Warning"), id="type"),
        pytest.param(
            series_key(OTHER_POOL, "ScaledUp", "Scaled tier high 2 -> 4", "Normal"),
            id="object (a re-created pool)",
        ),
    ],
)
def test_anything_else_different_is_another_event(other: tuple[str, ...]) -> None:
    series = EventSeries()
    series.started(series_key(POOL, "ScaledUp", "Scaled tier high 2 -> 4", "Normal"), "first", at(0))
    assert series.repeat_of(other, at(1)) is None  # type: ignore[arg-type]


def test_the_key_is_the_message_as_written() -> None:
    long = "x" * 2000
    assert series_key(POOL, "R", long, "Normal") == series_key(POOL, "R", long + "tail", "Normal")


def test_the_oldest_series_is_forgotten_at_the_limit() -> None:
    series = EventSeries(limit=2)
    keys = [series_key(POOL, "R", f"m{i}", "Normal") for i in range(3)]
    for i, key in enumerate(keys):
        series.started(key, f"e{i}", at(i))
    assert series.repeat_of(keys[0], at(5)) is None
    assert series.repeat_of(keys[2], at(5)) == ("e2", 2)


# --- the simulation's count


def _decisions(depths: list[tuple[float, int, int]]) -> list[tuple[float, object]]:
    """Real decisions of the operator's `decide` for (time, queue depth, current replicas) polls."""
    tier = TIER
    history, out = TierHistory(), []
    for now, depth, current in depths:
        (d,) = decide([tier], {"high": Observation(queue_depth=depth, in_flight=0)}, {"high": current},
                      {"high": history}, now=now)  # fmt: skip
        history = d.history
        if d.changed:
            out.append((now, d))
    return out


def test_the_sim_counts_one_object_per_distinct_message_in_the_window() -> None:
    target = TIER.autoscaling.target_depth_per_replica
    # The same jump twice within the window (same figures, same message), then once after it.
    later = SERIES_WINDOW.total_seconds() + 400
    decisions = _decisions([(0, 4 * target, 1), (300, 4 * target, 1), (later, 4 * target, 1)])
    assert len(decisions) == 3 and len({d.message for _, d in decisions}) == 1  # type: ignore[attr-defined]
    counted = scaling_events(decisions, 3600.0)  # type: ignore[arg-type]
    assert (counted.changes, counted.created, counted.counted) == (3, 2, 1)
    assert counted.per_hour(counted.changes) == 3.0
