"""Logging setup: plain or JSON lines, with broker credentials scrubbed from every record."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# user:password@ or :password@ inside any redis URL, wherever it appears in a message.
_CREDENTIALS = re.compile(r"(?i)(rediss?://)[^@\s/'\"]*@")


def scrub(text: str) -> str:
    return _CREDENTIALS.sub(r"\1***@", text)


class ScrubCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure(level: str = "INFO", json_logs: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ScrubCredentials())
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kopf.objects logs every successful watch-event handler at INFO: noise at fleet scale.
    for noisy in ("kubernetes.client.rest", "urllib3", "aiohttp.access", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
