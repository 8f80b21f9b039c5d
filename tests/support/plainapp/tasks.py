"""`plainapp.hold(seconds)`: hold a worker slot, recording start and finish in Redis."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis
from plainapp import app

STARTED_KEY = "plain:started"
DONE_KEY = "plain:done"


def _record(key: str, task: Any, **extra: Any) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        info = task.request.delivery_info or {}
        client.rpush(key, json.dumps({
            "id": task.request.id, "worker": os.environ.get("POD_NAME") or socket.gethostname(),
            "redelivered": bool(info.get("redelivered")), "at": time.time(), **extra,
        }))  # fmt: skip
    finally:
        client.close()


@app.task(bind=True, name="plainapp.hold")
def hold(self: Any, seconds: float, redelivered_seconds: float | None = None) -> None:
    """Hold `seconds` (`redelivered_seconds` instead when the message is a redelivery)."""
    _record(STARTED_KEY, self)
    again = bool((self.request.delivery_info or {}).get("redelivered"))
    time.sleep(redelivered_seconds if again and redelivered_seconds is not None else seconds)
    _record(DONE_KEY, self)
