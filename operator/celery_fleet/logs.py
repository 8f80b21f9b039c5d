"""Logging setup: plain or JSON lines, with credentials scrubbed from every line and traceback."""

from __future__ import annotations

import json
import logging
import sys
import time

from celery_fleet.planning.redact import scrub_credentials

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    """The whole formatted record is scrubbed: message, exception traceback and stack alike."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_credentials(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub_credentials(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = scrub_credentials(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = scrub_credentials(self.formatStack(record.stack_info))
        return json.dumps(entry)


def configure(level: str = "INFO", json_logs: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else PlainFormatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kopf.objects logs every successful watch-event handler at INFO: noise at fleet scale.
    for noisy in ("kubernetes.client.rest", "urllib3", "aiohttp.access", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
