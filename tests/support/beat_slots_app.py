"""A Celery app for shared-schedule-state tests: an aligned entry and an interval entry.

`celery -A tests.support.beat_slots_app beat --scheduler celery_fleet.beat.scheduler:LeaseScheduler`
under the elector with --schedule-state. No worker consumes the tasks: each send stays in Redis
(list SLOTS_QUEUE) with headers saying which entry, which slot it was due for (`slot`), the
`last_run_at` beat judged it against (`last_run_at`: from the Lease after a failover, so a restarted
countdown shows), who sent it and when.

- `aligned`: due once per SLOTS_ALIGNED_SECONDS-wide slot of the wall clock (as a crontab is per
  minute: SLOTS_CRONTAB=1 makes it a real `crontab()`, every minute, for the benchmark);
- `interval`: a plain Celery interval of SLOTS_INTERVAL_SECONDS.

This module imports Celery only: beat loads it with the elector's single file on its path, whose
`celery_fleet` package has the elector and the scheduler and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from typing import Any

from celery import Celery
from celery.schedules import crontab, schedstate, schedule
from celery.signals import before_task_publish

QUEUE = os.environ.get("SLOTS_QUEUE", "slots")
ALIGNED_SECONDS = float(os.environ.get("SLOTS_ALIGNED_SECONDS", "6"))
INTERVAL_SECONDS = float(os.environ.get("SLOTS_INTERVAL_SECONDS", "3"))
ALIGNED_TASK, INTERVAL_TASK = "slots.aligned", "slots.interval"

app = Celery("slots", broker=os.environ.get("SLOTS_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(broker_connection_retry_on_startup=True, beat_max_loop_interval=1, task_default_queue=QUEUE)

# task -> (slot, last_run_at) of the entry's last "due" answer, stamped on the publish that follows.
_due: dict[str, tuple[float, float]] = {}


class every_aligned(schedule):  # type: ignore[misc]  # lower-case like celery's own schedules
    """Due once per wall-clock slot of `period` seconds (catch-up: one send, for the current slot)."""

    def __init__(self, period: float) -> None:
        super().__init__(run_every=period)
        self.period = period

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = time.time()
        last = last_run_at.timestamp()
        until_next = (math.floor(now / self.period) + 1) * self.period - now
        if math.floor(now / self.period) > math.floor(last / self.period):
            _due[ALIGNED_TASK] = (math.floor(now / self.period) * self.period, last)
            return schedstate(True, until_next)
        return schedstate(False, until_next)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.period,))


class stamped_crontab(crontab):  # type: ignore[misc]
    """crontab(), every minute, noting the minute it was due for."""

    def is_due(self, last_run_at: datetime) -> schedstate:
        state = super().is_due(last_run_at)
        if state.is_due:
            _due[ALIGNED_TASK] = (math.floor(time.time() / 60) * 60, last_run_at.timestamp())
        return state


class stamped_interval(schedule):  # type: ignore[misc]
    def is_due(self, last_run_at: datetime) -> schedstate:
        state = super().is_due(last_run_at)
        if state.is_due:
            _due[INTERVAL_TASK] = (time.time(), last_run_at.timestamp())
        return state


@app.task(name=ALIGNED_TASK)  # type: ignore[untyped-decorator]
def aligned() -> None:
    """Never run: the message is the record."""


@app.task(name=INTERVAL_TASK)  # type: ignore[untyped-decorator]
def interval() -> None:
    """Never run: the message is the record."""


app.conf.beat_schedule = {
    "aligned": {
        "task": ALIGNED_TASK,
        "schedule": stamped_crontab() if os.environ.get("SLOTS_CRONTAB") else every_aligned(ALIGNED_SECONDS),
    },
    "interval": {"task": INTERVAL_TASK, "schedule": stamped_interval(run_every=INTERVAL_SECONDS)},
}


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender not in (ALIGNED_TASK, INTERVAL_TASK) or headers is None:
        return
    slot, last = _due.get(sender, (time.time(), 0.0))
    headers["slot"] = slot
    headers["last_run_at"] = last
    headers["sender"] = os.environ.get("SLOTS_SENDER", f"pid-{os.getpid()}")
    headers["published_at"] = time.time()


def read_sends(client: Any, queue: str = QUEUE) -> list[dict[str, Any]]:
    """Every send in the queue, oldest first: task, slot, last_run_at, sender, published_at."""
    sends = []
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        sends.append({k: headers[k] for k in ("task", "slot", "last_run_at", "sender", "published_at")})
    return sorted(sends, key=lambda s: float(s["published_at"]))
