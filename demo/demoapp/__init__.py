"""The demo Celery application: tasks of configurable duration on three priority queues, and a
periodic tick sent by Celery Beat.

Configured from the environment as a pod would be: CELERY_BROKER_URL (the operator sets it from
the pool's broker Secret). Each task records when it was sent, started and finished in Redis
(the broker's database, keys under ``demo:``) so the demo can report waits per tier.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

QUEUES = ("high_priority", "medium_priority", "low_priority")
# kombu's Redis transport keeps one list per priority step; 0 is consumed first.
PRIORITY_STEPS = [0, 3, 6, 9]
TICK_SECONDS = 5.0

app = Celery(
    "demoapp", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"), include=["demoapp.tasks"]
)
app.conf.update(
    broker_transport_options={"priority_steps": PRIORITY_STEPS, "queue_order_strategy": "priority"},
    broker_connection_retry_on_startup=True,
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="medium_priority",
    task_routes={"demoapp.tick": {"queue": "medium_priority"}},
    task_ignore_result=True,
    # Acknowledge when a task is done: a running task stays in the broker's `unacked` hash, so the
    # operator counts it as in-flight and never scales a busy tier to nothing, and the prefetch
    # window (concurrency x 1) spans the running tasks, so a new worker gets its fair share of a
    # burst. On SIGTERM the worker finishes what it runs (warm shutdown) and hands its prefetched,
    # unstarted messages back to the queue: a scale-down loses nothing.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    # No soft-shutdown phase: SIGTERM is a plain warm shutdown, bounded by the pod's grace period.
    worker_soft_shutdown_timeout=0.0,
    beat_schedule={"tick": {"task": "demoapp.tick", "schedule": TICK_SECONDS}},
)
