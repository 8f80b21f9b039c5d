"""spec.broker.tls reaches the worker pods as kombu reads it: files mounted, ssl_* options in the URL."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.api.models import Broker, InvalidSpec, parse_pool
from celery_fleet.planning.workload import broker_tls_volume, broker_url_env

CA = {"ca": {"secretName": "ca", "key": "ca.crt"}}


def broker(**fields: Any) -> Broker:
    return Broker.model_validate(fields)


def test_literal_failover_urls_get_the_options_on_every_tls_segment() -> None:
    (env,) = broker_url_env(broker(url="rediss://a:6380/0?ssl_cert_reqs=required;rediss://b:6380/0", tls=CA))
    ca = "ssl_cert_reqs=required&ssl_ca_certs=/etc/celery-fleet/broker-tls/ca.crt"
    assert env == {"name": "CELERY_BROKER_URL", "value": f"rediss://a:6380/0?{ca};rediss://b:6380/0?{ca}"}


def test_secret_url_is_expanded_in_the_pod_with_the_query_appended() -> None:
    tls = {"insecureSkipVerify": True}
    env = broker_url_env(broker(urlSecretRef={"name": "s", "key": "url"}, tls=tls))
    assert env == [
        {"name": "CELERY_FLEET_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "url"}}},
        {"name": "CELERY_BROKER_URL", "value": "$(CELERY_FLEET_BROKER_URL)?ssl_cert_reqs=none"},
    ]
    assert broker_tls_volume(broker(urlSecretRef={"name": "s", "key": "url"}, tls=tls)) == []


def test_ca_from_a_configmap_and_a_client_certificate_are_one_projected_volume() -> None:
    tls = {"ca": {"configMapName": "ca", "key": "bundle.pem"}, "clientCertificate": {"secretName": "client"}}
    (volume,) = broker_tls_volume(broker(url="rediss://r:6380/0", tls=tls))
    assert volume["projected"]["sources"] == [
        {"configMap": {"name": "ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}},
        {
            "secret": {
                "name": "client",
                "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
            }
        },
    ]


@pytest.mark.parametrize(
    ("tls", "words"),
    [
        pytest.param(
            {"ca": {"key": "ca.crt"}}, "set exactly one of secretName or configMapName", id="ca-without-source"
        ),
        pytest.param({**CA, "insecureSkipVerify": True}, "set either ca or insecureSkipVerify", id="ca-and-insecure"),
    ],
)
def test_tls_rules(tls: dict[str, Any], words: str) -> None:
    body = {"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": {"name": "p"},
            "spec": {"app": "a:app", "image": "i:1", "broker": {"url": "rediss://r:6380/0", "tls": tls}}}  # fmt: skip
    with pytest.raises(InvalidSpec) as err:
        parse_pool(body)
    assert words in str(err.value)


def test_sentinel_urls_need_a_master_name() -> None:
    sentinels = {"url": "sentinel://s1:26379;sentinel://s2:26379"}
    body = {"apiVersion": "celeryfleet.io/v1alpha1", "kind": "CeleryWorkerPool", "metadata": {"name": "p"},
            "spec": {"app": "a:app", "image": "i:1", "broker": sentinels}}  # fmt: skip
    with pytest.raises(InvalidSpec) as err:
        parse_pool(body)
    assert "masterName" in str(err.value)
