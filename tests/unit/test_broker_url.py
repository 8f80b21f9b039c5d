"""Broker URLs as kombu reads them: failover lists, Sentinel lists, and only the query we support."""

from __future__ import annotations

import pytest

from celery_fleet.api.broker_url import BrokerUrlError, parse_broker_url
from celery_fleet.brokers import BrokerError, ErrorKind
from celery_fleet.brokers.redis.target import RedisTarget

SECRET = "s3cret"


@pytest.mark.parametrize(
    ("url", "kind", "hosts"),
    [
        pytest.param("redis://r1:6379/0", "redis", [("r1", 6379)], id="one"),
        pytest.param("redis://r1/0; redis://r2:7000/0", "redis", [("r1", 6379), ("r2", 7000)], id="failover-list"),
        pytest.param("sentinel://s1;sentinel://s2:26380", "sentinel", [("s1", 26379), ("s2", 26380)], id="sentinels"),
        pytest.param("rediss://r1:6380/1?ssl_cert_reqs=CERT_REQUIRED", "redis", [("r1", 6380)], id="celery-tls-query"),
    ],
)
def test_parses_like_kombu(url: str, kind: str, hosts: list[tuple[str, int]]) -> None:
    parsed = parse_broker_url(url)
    assert parsed.kind == kind and [(e.host, e.port) for e in parsed.endpoints] == hosts


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("redis://shown:6379/0?host=elsewhere", "'host'", id="host-in-query"),
        pytest.param("redis://r/0?ssl_ca_certs=/var/run/secrets/kubernetes.io/token", "'ssl_ca_certs'", id="file"),
        pytest.param("redis://r/0?socket_timeout=999", "'socket_timeout'", id="timeout"),
        pytest.param("rediss://r/0?ssl_cert_reqs=none", "'ssl_cert_reqs'", id="weaker-tls-needs-the-spec"),
        pytest.param("redis://r1/0;amqp://r2", "segment 2", id="failover-scheme"),
        pytest.param("redis://r1/0;redis://r2/x", "segment 2", id="failover-db"),
        pytest.param("redis://r1/0;sentinel://s1", "do not mix", id="mixed"),
        pytest.param("redis://r1/0;", "empty", id="empty-segment"),
        pytest.param(";".join(["redis://r/0"] * 9), "at most 8", id="too-many"),
    ],
)
def test_refuses_with_a_message_that_never_echoes_the_url(url: str, words: str) -> None:
    with pytest.raises(BrokerUrlError) as err:
        parse_broker_url(url)
    assert words in err.value.message
    assert "elsewhere" not in err.value.message and "/var/run" not in err.value.message


def test_passwords_of_every_segment_are_secrets() -> None:
    target = RedisTarget.parse(f"redis://r1:6379/0;redis://:{SECRET}@r2:6379/0")
    assert SECRET in target.secrets and len(target.urls) == 2
    assert target.display == "r1:6379/0 (+1 failover)"
    assert SECRET not in target.scrub(f"failed: {SECRET}")


def test_the_poller_refuses_what_the_model_refuses() -> None:
    with pytest.raises(BrokerError) as err:
        RedisTarget.parse("redis://shown:6379/0?host=elsewhere")
    assert err.value.kind is ErrorKind.INVALID_URL and "'host'" in str(err.value)
