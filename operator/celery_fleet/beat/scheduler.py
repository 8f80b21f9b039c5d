"""`celery beat --scheduler celery_fleet.beat.scheduler:LeaseScheduler`: schedule state on the Lease.

The default scheduler of a CeleryBeat. Each entry's last run lives on the beat's Lease, so the
standby that takes over after a failover starts where the old leader stopped (docs/beat.md):
- at start, every entry's `last_run_at` and run count are read from the Lease;
- an entry is due only once its run is recorded there, through the fence (`schedule_store`);
  `reserve` then advances it to exactly the recorded time and beat sends the task.

A record that fails is retried after RETRY_SECONDS; a record the fence refuses (another term holds
the Lease) stops all sending for the life of this process (the elector stops it soon after).
Standard library and Celery only, Python 3.8+: it runs in the user's image.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import Any

from celery.beat import Scheduler
from celery.schedules import schedstate

from celery_fleet.elector.election import LeaseApiError, UsageError
from celery_fleet.elector.schedule_state import STATE_ENV, EntryState, restore
from celery_fleet.elector.schedule_store import Deposed, ScheduleStore, StoreConfig

log = logging.getLogger(__name__)

# Beat's next look at an entry whose run could not be recorded (apiserver unreachable, conflicts).
RETRY_SECONDS = 1.0


def _utc(moment: datetime, tz: Any) -> datetime:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)
    return aware.astimezone(timezone.utc)  # noqa: UP017 (3.8 has no datetime.UTC)


class LeaseScheduler(Scheduler):  # type: ignore[misc]  # Celery is untyped
    """An in-memory schedule whose runs are recorded on the Lease, fenced, before they are sent."""

    def __init__(self, *args: Any, store: ScheduleStore | None = None, **kwargs: Any) -> None:
        self._store = store
        self._loaded = False
        self._deposed = False
        self._recorded: dict[str, datetime] = {}  # entry name -> the run just recorded, for reserve
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        if self._store is None:
            raw = os.environ.get(STATE_ENV)
            if not raw:
                raise UsageError(
                    f"LeaseScheduler needs {STATE_ENV}: run beat under the celery-fleet elector with "
                    "--schedule-state (a CeleryBeat does), or pick another --scheduler"
                )
            self._store = ScheduleStore.from_config(StoreConfig.from_env(raw))
        self._load()

    def _load(self) -> bool:
        assert self._store is not None
        try:
            stored, problem = self._store.load()
        except Deposed as exc:
            self._depose(exc)
            return False
        except LeaseApiError as exc:
            log.warning("beat: cannot read the schedule state, sending nothing until it can: %s", exc)
            return False
        if problem:
            log.warning("beat: %s", problem)
        now = _utc(self.app.now(), self.app.timezone)
        restored = restore(stored, list(self.schedule), now)
        for name, state in restored.items():
            entry = self.schedule[name]
            entry.last_run_at = state.last_run_at.astimezone(self.app.timezone)
            entry.total_run_count = state.total_run_count
        # An entry that never ran counts from when it was first scheduled, as in Celery's own file:
        # recorded now, so a slot due before its first run, in a failover, is not lost.
        origins = {
            name: EntryState(_utc(entry.last_run_at, self.app.timezone), entry.total_run_count)
            for name, entry in self.schedule.items()
            if name not in restored
        }
        if origins:
            try:
                self._store.record_runs(origins, keep=set(self.schedule))
            except Deposed as exc:
                self._depose(exc)
                return False
            except LeaseApiError as exc:
                log.warning("beat: cannot record the new entries' start, sending nothing until it can: %s", exc)
                return False
        log.info(
            "beat: schedule state read from the lease: %d of %d entries had run", len(restored), len(self.schedule)
        )
        self._loaded = True
        return True

    def _depose(self, exc: Exception) -> None:
        if not self._deposed:
            log.error("beat: no longer the leader, sending nothing more: %s", exc)
        self._deposed = True

    def is_due(self, entry: Any) -> Any:
        if self._deposed:
            return schedstate(False, self.max_interval)
        if not self._loaded and not self._load():
            return schedstate(False, RETRY_SECONDS)
        due, next_in = entry.is_due()
        if not due:
            return schedstate(due, next_in)
        at = entry.default_now()
        run = EntryState(_utc(at, self.app.timezone), entry.total_run_count + 1)
        assert self._store is not None
        try:
            self._store.record(entry.name, run, keep=set(self.schedule))
        except Deposed as exc:
            self._depose(exc)
            return schedstate(False, self.max_interval)
        except LeaseApiError as exc:
            log.warning("beat: cannot record the run of %s, not sending it yet: %s", entry.name, exc)
            return schedstate(False, RETRY_SECONDS)
        self._recorded[entry.name] = at
        return schedstate(due, next_in)

    def reserve(self, entry: Any) -> Any:
        at = self._recorded.pop(entry.name, None)
        # The entry's last run is exactly the run on the Lease.
        new_entry = entry.next(last_run_at=at) if at is not None else next(entry)
        self.schedule[entry.name] = new_entry
        return new_entry

    @property
    def info(self) -> str:
        return "    . db -> the beat Lease (celeryfleet.io/beat-schedule)"
