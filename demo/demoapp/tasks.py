"""The demo's tasks. Their records (JSON in Redis lists) are what the demo summary is built from."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import redis

from demoapp import app

DONE_KEY = "demo:done"
TICKS_KEY = "demo:ticks"
STARTED_KEY = "demo:started"

_local = threading.local()


def _redis() -> redis.Redis:
    client: redis.Redis | None = getattr(_local, "client", None)
    if client is None:
        client = redis.Redis.from_url(app.conf.broker_url)
        _local.client = client
    return client


def _worker() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


@app.task(bind=True, name="demoapp.work")
def work(self: Any, duration: float, sent_at: float | None = None) -> float:
    """Hold a worker slot for `duration` seconds (sleeping: the demo is about scheduling, not CPU)."""
    started = time.time()
    info = self.request.delivery_info or {}
    record = {
        "id": self.request.id,
        "queue": info.get("routing_key"),
        "priority": info.get("priority"),
        "worker": _worker(),
        "sent": sent_at,
        "started": started,
        "duration": duration,
    }
    _redis().rpush(STARTED_KEY, json.dumps(record))
    time.sleep(duration)
    record["finished"] = time.time()
    _redis().rpush(DONE_KEY, json.dumps(record))
    return duration


@app.task(bind=True, name="demoapp.tick")
def tick(self: Any) -> None:
    """The periodic task: one record per beat tick, so a second scheduler would show as doubled ticks."""
    now = time.time()
    info = self.request.delivery_info or {}
    _redis().rpush(TICKS_KEY, json.dumps({"at": now, "worker": _worker()}))
    _redis().rpush(DONE_KEY, json.dumps({"id": self.request.id, "queue": info.get("routing_key"), "worker": _worker(),
                                         "sent": None, "started": now, "finished": now}))  # fmt: skip
