"""Which beat schedulers can be exactly once through a failover, and what to tell the user. (pure)

Only the operator's LeaseScheduler (spec.scheduler unset) records each run, fenced, before it is
sent (docs/beat.md). Every other scheduler still runs behind the elector (never two beats), but
a failover can skip or repeat runs: the operator says so with a Warning Event, once per spec.
"""

from __future__ import annotations

from celery_fleet.planning.beat_workload import DEFAULT_SCHEDULER

NOT_EXACTLY_ONCE = "SchedulerNotExactlyOnce"
_DOC = "See docs/beat.md (Schedulers and the elector)."

# Celery's `--scheduler` takes `module:Class` or `module.Class`, and a few aliases.
_PERSISTENT = {"celery.beat.PersistentScheduler"}
_DJANGO = {"django_celery_beat.schedulers.DatabaseScheduler", "django"}
_REDBEAT = {"redbeat.RedBeatScheduler", "redbeat.schedulers.RedBeatScheduler"}


def scheduler_advice(scheduler: str | None) -> str | None:
    """Why `scheduler` cannot be exactly once across a failover, or None when it can."""
    if scheduler is None or scheduler.replace(":", ".") == DEFAULT_SCHEDULER.replace(":", "."):
        return None
    name = scheduler.replace(":", ".")
    if name in _PERSISTENT:
        return (
            f"spec.scheduler {scheduler} keeps its state in a file of the pod: after a failover the new "
            "leader skips the runs due in the gap and restarts every interval countdown. Remove spec.scheduler "
            f"to keep the state on the Lease. {_DOC}"
        )
    if name in _DJANGO:
        return (
            f"spec.scheduler {scheduler} saves last runs at its next sync, after the send and unfenced: a leader "
            "killed between the two makes the next one send those runs again. Set beat_sync_every = 1 to narrow "
            f"it, or remove spec.scheduler. {_DOC}"
        )
    if name in _REDBEAT:
        return (
            f"spec.scheduler {scheduler}: set redbeat_lock_key = None in the Celery config (the Lease is the lock; "
            "with redbeat's lock on, a failover waits for it, 25 minutes by default). Its state is saved after the "
            f"send and unfenced, so a kill between the two repeats a run. {_DOC}"
        )
    return (
        f"spec.scheduler {scheduler}: the operator cannot tell whether it keeps its state across a failover; "
        f"runs due in a failover may be skipped or repeated. {_DOC}"
    )
