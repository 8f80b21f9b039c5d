"""A tiny Celery app for the depth-reader tests: tasks that hold a worker until a file appears.

Configured from the environment so the same module serves the producer (in the test process) and
a real `celery worker` subprocess:

- DEPTH_BROKER_URL: the broker (the test's redis-server);
- DEPTH_KEYPREFIX: broker_transport_options.global_keyprefix (default none);
- DEPTH_ACKS_LATE: "1" to acknowledge after the task ran (then running tasks stay in `unacked`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

app = Celery("celery_depth_app", broker=os.environ.get("DEPTH_BROKER_URL", "redis://127.0.0.1:6379/0"))
options: dict[str, Any] = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
if os.environ.get("DEPTH_KEYPREFIX"):
    options["global_keyprefix"] = os.environ["DEPTH_KEYPREFIX"]
app.conf.update(
    broker_transport_options=options,
    task_acks_late=os.environ.get("DEPTH_ACKS_LATE") == "1",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

HOLD = "celery_depth_app.hold"


@app.task(name=HOLD)  # type: ignore[untyped-decorator]  # celery ships no type hints
def hold(release_file: str, started_dir: str, limit_seconds: float = 120.0) -> str:
    """Mark this task as started, then block until `release_file` exists (or the safety limit)."""
    Path(started_dir, f"{os.getpid()}-{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + limit_seconds
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"
