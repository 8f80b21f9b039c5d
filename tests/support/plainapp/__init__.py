"""A plain Celery app on Celery's defaults (early ack, default prefetch, no priorities), as users run it.

Configured from the environment as a pod would be: CELERY_BROKER_URL (set by the operator);
PLAIN_ACKS_LATE=1 turns on ``task_acks_late`` (the careful-user variant); PLAIN_REMOTE_CONTROL=0
turns remote control off; PLAIN_VISIBILITY_TIMEOUT=N sets kombu's ``visibility_timeout``;
PLAIN_BROKER_URL replaces the broker URL (the same Redis as another user, which a test can lock out
while the operator still reads it).
Tasks record, in the broker's Redis (keys under ``plain:``), which
worker started and finished them and whether the message was a redelivery, so tests count lost,
killed and redelivered tasks.
"""

from __future__ import annotations

import os

from celery import Celery

if os.environ.get("PLAIN_BROKER_URL"):
    os.environ["CELERY_BROKER_URL"] = os.environ["PLAIN_BROKER_URL"]  # Celery reads it before its own setting

app = Celery("plainapp", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
             include=["plainapp.tasks"])  # fmt: skip
app.conf.task_ignore_result = True
if os.environ.get("PLAIN_ACKS_LATE") == "1":
    app.conf.task_acks_late = True
if os.environ.get("PLAIN_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {"visibility_timeout": int(os.environ["PLAIN_VISIBILITY_TIMEOUT"])}
if os.environ.get("PLAIN_REMOTE_CONTROL") == "0":
    app.conf.worker_enable_remote_control = False
