"""brokers.redis.target.classify: what answers on a broker's port never reaches a status verbatim."""

from __future__ import annotations

import pytest
from redis import exceptions as rexc

from celery_fleet.brokers.redis.target import FIRST_LINE_CHARS, RedisTarget, classify
from celery_fleet.brokers.source import ErrorKind

TARGET = RedisTarget.parse("redis://:hunter2@mail.internal:25/0")


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(rexc.InvalidResponse("Protocol Error: b'220 mail.internal ESMTP Postfix (Debian)'"), id="smtp"),
        pytest.param(rexc.InvalidResponse("Protocol Error: b'HTTP/1.1 400 Bad Request'"), id="http"),
        pytest.param(UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte"), id="binary"),
    ],
)
def test_a_server_that_is_not_redis_is_named_but_not_quoted(exc: BaseException) -> None:
    err = classify(exc, TARGET)
    assert err.kind is ErrorKind.RESPONSE_ERROR
    assert err.message == "the server at mail.internal:25/0 does not answer as Redis does"


def test_an_error_reply_is_one_printable_bounded_line() -> None:
    hostile = "ERR " + "\x1b[31mred\x00" + "A" * 10_000 + "\nsecond line with hunter2"
    err = classify(rexc.ResponseError(hostile), TARGET)
    assert err.kind is ErrorKind.RESPONSE_ERROR
    assert "\x1b" not in err.message and "\x00" not in err.message and "second line" not in err.message
    assert "hunter2" not in err.message and err.message.endswith("...")
    assert len(err.message) < FIRST_LINE_CHARS + 80
