"""A Celery app whose schedule lives in django-celery-beat's tables (SQLite), for the elector test.

    python -m tests.support.djbeat_app setup   # migrate, and one interval task every DJBEAT_EVERY s
    python -m tests.support.djbeat_app count   # prints the task's total_run_count from the database
    celery -A tests.support.djbeat_app beat --scheduler django_celery_beat.schedulers:DatabaseScheduler

Sends stay in Redis (list DJBEAT_QUEUE) with the sender (DJBEAT_SENDER) and time in their headers.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.support.djbeat_settings")
django.setup()

from celery import Celery  # noqa: E402 (after django.setup)
from celery.signals import before_task_publish  # noqa: E402

TASK = "djbeat.tick"
TASK_NAME = "every-few-seconds"
QUEUE = os.environ.get("DJBEAT_QUEUE", "djbeat")

app = Celery("djbeat", broker=os.environ.get("DJBEAT_BROKER_URL", "redis://127.0.0.1:6379/0"))
# beat_sync_every = 1: the database learns of each run right after its send (docs/beat.md).
app.conf.update(
    broker_connection_retry_on_startup=True,
    beat_max_loop_interval=1,
    task_default_queue=QUEUE,
    beat_sync_every=1,
    timezone="UTC",
)


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def tick() -> None:
    """Never run: the message is the record."""


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender == TASK and headers is not None:
        headers["sender"] = os.environ.get("DJBEAT_SENDER", f"pid-{os.getpid()}")
        headers["published_at"] = time.time()


def _setup() -> None:
    from django.core.management import call_command
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    call_command("migrate", verbosity=0)
    every = IntervalSchedule.objects.create(every=int(os.environ.get("DJBEAT_EVERY", "3")), period="seconds")
    PeriodicTask.objects.create(name=TASK_NAME, task=TASK, interval=every)


def _count() -> int:
    from django_celery_beat.models import PeriodicTask

    return int(PeriodicTask.objects.get(name=TASK_NAME).total_run_count)


if __name__ == "__main__":
    if sys.argv[1:] == ["setup"]:
        _setup()
    elif sys.argv[1:] == ["count"]:
        print(_count())
    else:
        sys.exit("usage: python -m tests.support.djbeat_app setup|count")
