"""One client builder for polls and control: TLS settings reach every client, and client
certificates are written once per distinct content, shared and removed with the last user."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from celery_fleet.brokers.control import ControlError, ControlTarget, PidboxControl
from celery_fleet.brokers.redis.connection import CERTIFICATE_FILES, TlsSettings, open_clients
from tests.support.redis_server import free_port

CA = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n"


def test_sixty_five_pools_on_one_secret_write_one_pair_removed_with_the_last() -> None:
    before = set(CERTIFICATE_FILES.files())
    tls = TlsSettings(ca_pem=CA, cert_pem=CERT, key_pem=KEY)
    opened = [open_clients(f"rediss://:pw@broker-{i}:6379/0", tls=tls) for i in range(65)]
    written = set(CERTIFICATE_FILES.files()) - before
    assert len(written) == 2
    kwargs = opened[0].clients[0].connection_pool.connection_kwargs
    cert_path = kwargs["ssl_certfile"]
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(cert_path)).st_mode) == 0o700
    assert {kw.clients[0].connection_pool.connection_kwargs["ssl_certfile"] for kw in opened} == {cert_path}

    other = open_clients("rediss://:pw@other:6379/0", tls=TlsSettings(ca_pem=CA, cert_pem=CERT + "\n", key_pem=KEY))
    assert len(set(CERTIFICATE_FILES.files()) - before) == 4  # another content, another pair

    async def close_all() -> None:
        for o in opened[:-1]:
            await o.aclose()
        assert os.path.exists(cert_path)  # one user left
        await opened[-1].aclose()
        await opened[-1].aclose()  # closing twice releases once
        await other.aclose()

    asyncio.run(close_all())
    assert set(CERTIFICATE_FILES.files()) - before == set()


@pytest.mark.parametrize(
    ("url", "tls", "expected"),
    [
        pytest.param("rediss://h:6379/0", TlsSettings(ca_pem=CA), {"ssl_cert_reqs": "required", "ssl_ca_data": CA},
                     id="verify-with-the-pools-ca"),
        pytest.param("rediss://h:6379/0", TlsSettings(insecure_skip_verify=True),
                     {"ssl_cert_reqs": "none", "ssl_check_hostname": False}, id="insecure-only-when-asked"),
        pytest.param("rediss://h:6379/0", None, {}, id="system-cas-by-default"),
        pytest.param("redis://h:6379/0", TlsSettings(ca_pem=CA), {}, id="plain-url-no-tls"),
    ],
)  # fmt: skip
def test_tls_settings_reach_the_client(url: str, tls: TlsSettings | None, expected: dict[str, object]) -> None:
    opened = open_clients(url, tls=tls)
    kwargs = opened.clients[0].connection_pool.connection_kwargs
    assert {k: kwargs[k] for k in expected} == expected
    if tls is None and url.startswith("rediss"):
        assert kwargs.get("ssl_cert_reqs", "required") == "required"  # redis-py's default: verify
    asyncio.run(opened.aclose())


def test_a_refused_broker_is_a_control_error_that_names_no_secret() -> None:
    control = PidboxControl()
    target = ControlTarget(f"redis://:hunter2@127.0.0.1:{free_port()}/0")

    async def ask() -> str:
        try:
            await control.census(target, ["a"])
        except ControlError as err:
            return str(err)
        finally:
            await control.aclose()
        raise AssertionError("a refused broker must not read as an answer")

    message = asyncio.run(ask())
    assert message.startswith("cannot reach 127.0.0.1:") and "hunter2" not in message
    assert "hunter2" not in repr(control) and "hunter2" not in repr(target)
