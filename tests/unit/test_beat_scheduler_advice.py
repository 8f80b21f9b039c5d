"""Which schedulers get the SchedulerNotExactlyOnce warning. (pure)"""

from __future__ import annotations

import pytest

from celery_fleet.planning.beat_scheduler import scheduler_advice
from celery_fleet.planning.beat_workload import DEFAULT_SCHEDULER


@pytest.mark.parametrize("scheduler", [None, DEFAULT_SCHEDULER, DEFAULT_SCHEDULER.replace(":", ".")])
def test_the_lease_scheduler_needs_no_advice(scheduler: str | None) -> None:
    assert scheduler_advice(scheduler) is None


@pytest.mark.parametrize(
    ("scheduler", "says"),
    [
        ("celery.beat:PersistentScheduler", "file of the pod"),
        ("celery.beat.PersistentScheduler", "file of the pod"),
        ("django_celery_beat.schedulers:DatabaseScheduler", "beat_sync_every = 1"),
        ("django", "beat_sync_every = 1"),
        ("redbeat.RedBeatScheduler", "redbeat_lock_key = None"),
        ("redbeat.schedulers:RedBeatScheduler", "redbeat_lock_key = None"),
        ("myapp.sched:Custom", "cannot tell"),
    ],
)
def test_other_schedulers_are_warned_about(scheduler: str, says: str) -> None:
    advice = scheduler_advice(scheduler)
    assert advice is not None and says in advice and scheduler in advice and "docs/beat.md" in advice
