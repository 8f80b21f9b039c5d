"""A Celery app on redbeat (state in Redis) with its own lock off, for the elector test.

    celery -A tests.support.redbeat_app beat --scheduler redbeat.RedBeatScheduler

One interval entry every REDBEAT_EVERY s; sends stay in Redis (list REDBEAT_QUEUE) with the sender
(REDBEAT_SENDER) and time in their headers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

TASK = "redbeatapp.tick"
ENTRY = "every-few-seconds"
QUEUE = os.environ.get("REDBEAT_QUEUE", "redbeat")
BROKER = os.environ.get("REDBEAT_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("redbeatapp", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    beat_max_loop_interval=1,
    task_default_queue=QUEUE,
    redbeat_redis_url=BROKER,
    # The Lease is the lock: with redbeat's own, a new leader waits for a dead one's to expire.
    redbeat_lock_key=None,
    beat_schedule={ENTRY: {"task": TASK, "schedule": float(os.environ.get("REDBEAT_EVERY", "3"))}},
)


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def tick() -> None:
    """Never run: the message is the record."""


@before_task_publish.connect  # type: ignore[untyped-decorator]
def _stamp(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if sender == TASK and headers is not None:
        headers["sender"] = os.environ.get("REDBEAT_SENDER", f"pid-{os.getpid()}")
        headers["published_at"] = time.time()
