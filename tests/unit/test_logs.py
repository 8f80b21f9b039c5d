"""Issue 13 item 8: no credential in any log line, traceback included, in either log format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from celery_fleet import logs
from celery_fleet.planning.redact import redact_urls, scrub_credentials

SECRET = "hunter2-Zq"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        pytest.param(f"redis://:{SECRET}@redis:6379/0", "redis://***@redis:6379/0", id="password-only"),
        pytest.param(f"rediss://app:{SECRET}@redis:6380/0", "rediss://***@redis:6380/0", id="user-and-password"),
        pytest.param(f"redis://redis:6379/0?password={SECRET}", "redis://redis:6379/0?password=***", id="query"),
        pytest.param(f"redis://r:6379/0?db=1&Password={SECRET}&x=1", "?db=1&Password=***&x=1", id="query-later"),
        pytest.param(f"sentinel://s:26379?sentinel_password={SECRET}", "sentinel_password=***", id="sentinel"),
        pytest.param(f"redis://r/0?ssl_password={SECRET}", "ssl_password=***", id="tls-key-password"),
        pytest.param(f"redis://r/0?token={SECRET}", "token=***", id="token"),
        pytest.param(f"redis://:{SECRET}/x@r:6379/0", "redis://***@r:6379/0", id="slash-in-password"),
        pytest.param(f"'redis://u:{SECRET}@r:1/0'", "'redis://***@r:1/0'", id="quoted"),
        pytest.param(f"redis://r1:6379/0;redis://:{SECRET}@r2:6379/0", "@r2:6379/0", id="failover-list"),
        pytest.param(f"amqp://guest:{SECRET}@rabbit//", "amqp://***@rabbit//", id="any-scheme"),
    ],
)
def test_scrub_masks_every_credential_and_keeps_the_rest(text: str, kept: str) -> None:
    clean = scrub_credentials(f"connect to {text} failed")
    assert SECRET not in clean
    assert kept in clean
    assert clean.startswith("connect to ") and clean.endswith(" failed")


def test_redact_drops_urls_whole() -> None:
    assert redact_urls(f"Error 111 connecting to redis://:{SECRET}@r:6379/0.") == "Error 111 connecting to <broker-url>"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_a_failure() -> None:
    log = logging.getLogger("celery_fleet.test")
    log.warning("pool a/b: cannot read rediss://app:%s@r:6380/0", SECRET)
    try:
        raise ConnectionError(f"Error connecting to redis://r:6379/0?password={SECRET}")
    except ConnectionError:
        log.exception("poll of redis://:%s@r:6379/0 failed", SECRET)


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_no_log_line_or_traceback_carries_a_credential(
    restore_logging: None, capsys: pytest.CaptureFixture[str], json_logs: bool
) -> None:
    logs.configure("INFO", json_logs=json_logs)
    _log_a_failure()
    text = capsys.readouterr().err
    assert "Traceback" in text and "ConnectionError" in text  # the traceback is there...
    assert SECRET not in text  # ...without the password
    assert "password=***" in text and "rediss://***@r:6380/0" in text
    if json_logs:
        entries = [json.loads(line) for line in text.splitlines()]
        assert [e["level"] for e in entries] == ["warning", "error"]
        assert "password=***" in entries[1]["exc"]
