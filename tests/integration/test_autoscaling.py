"""Issue 5: tiers scale from the true Redis depth (real Celery producers), hold when the broker fails."""

from __future__ import annotations

import base64
import json
import re
import secrets
from typing import Any

import pytest
from celery import Celery
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"


def _pool(name: str, broker: dict[str, Any], **autoscaling: Any) -> dict[str, Any]:
    knobs = {
        "targetDepthPerReplica": 100,
        "scaleDownStabilizationSeconds": 3,
        "scaleDownMaxStep": 10,
        "scaleDownPeriodSeconds": 1,
        **autoscaling,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": broker,
            "tiers": [
                {"name": "high", "queues": ["high_priority"], "concurrency": 4,
                 "replicas": {"min": 1, "max": 8}, "autoscaling": knobs},
                {"name": "low", "queues": ["low_priority"], "concurrency": 2,
                 "replicas": {"min": 1, "max": 4}, "autoscaling": knobs},
            ],
        },
    }  # fmt: skip


def _producer(url: str) -> Celery:
    app = Celery("producer", broker=url)
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
    app.conf.broker_connection_retry_on_startup = False
    return app


def _get(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _replicas(k8s_api: client.ApiClient, namespace: str, deployment: str) -> int:
    return int(client.AppsV1Api(k8s_api).read_namespaced_deployment(deployment, namespace).spec.replicas)


def _tier_status(pool: dict[str, Any], tier: str) -> dict[str, Any]:
    return next(t for t in (pool.get("status") or {}).get("tiers", []) if t["name"] == tier)


def _condition(pool: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (pool.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def _events(k8s_api: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    return [
        e for e in client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items if e.involved_object.name == name
    ]


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def test_burst_scales_up_by_true_depth_then_steps_down_after_drain(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, redis_db: Any,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    _apply(cluster, namespace, _pool("burst", {"url": redis_server.url}))
    wait_for(lambda: _replicas(k8s_api, namespace, "burst-high") == 1, timeout=120, message="high tier at min 1")

    producer = _producer(redis_server.url)
    with producer.connection_for_write() as conn:
        for i in range(600):
            producer.send_task("tasks.work", args=[i], queue="high_priority", priority=[0, 3, 6, 9][i % 4],
                               connection=conn)  # fmt: skip
    # Three quarters of the burst sit in priority sub-lists that plain LLEN would miss.
    assert redis_db.llen("high_priority") == 150

    wait_for(lambda: _replicas(k8s_api, namespace, "burst-high") == 6, timeout=30, message="high tier scaled to 6")
    assert _replicas(k8s_api, namespace, "burst-low") == 1

    def status_says_why() -> dict[str, Any] | None:
        tier = _tier_status(_get(k8s_api, namespace, "burst"), "high")
        return tier if tier.get("desiredReplicas") == 6 and tier.get("queueDepth") == 600 else None

    tier = wait_for(status_says_why, timeout=30, message="status shows desired 6 and depth 600")
    # The last step may have been taken while the burst was still landing (e.g. at 588 queued).
    match = re.search(r"-> 6: (\d+) queued \+ \d+ in flight, target 100 per replica", tier["lastScaleReason"])
    assert match and int(match.group(1)) > 500, tier["lastScaleReason"]
    scaled = [e for e in _events(k8s_api, namespace, "burst") if e.reason == "ScaledUp"]
    # The burst may be seen mid-flight (1 -> 3 -> 6): the last step names the full depth.
    assert any(e.message.startswith("Scaled tier high ") and "-> 6: " in e.message for e in scaled), [
        e.message for e in scaled
    ]

    # Drain through kombu's own purge (it clears every priority sub-list of the queue).
    with producer.connection_for_write() as conn:
        assert conn.default_channel.queue_purge("high_priority") == 600
    wait_for(lambda: _replicas(k8s_api, namespace, "burst-high") == 1, timeout=60, message="stepped down to 1")
    # The Event is posted after the scale is written: wait for it rather than read it once.
    wait_for(
        lambda: any(e.reason == "ScaledDown" for e in _events(k8s_api, namespace, "burst")),
        timeout=30,
        message="a ScaledDown Event",
    )


def test_broker_down_holds_replicas_and_reports_then_recovers(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    redis = RedisServer(tmp_path_factory.mktemp("redis-outage"))
    redis.start()
    try:
        _apply(cluster, namespace, _pool("outage", {"url": redis.url}, targetDepthPerReplica=10))
        producer = _producer(redis.url)
        with producer.connection_for_write() as conn:
            for i in range(30):
                producer.send_task("tasks.work", args=[i], queue="high_priority", connection=conn)
        wait_for(lambda: _replicas(k8s_api, namespace, "outage-high") == 3, timeout=60, message="scaled to 3")

        redis.stop()

        def unreachable() -> dict[str, Any] | None:
            cond = _condition(_get(k8s_api, namespace, "outage"), "BrokerReachable")
            return cond if cond and cond["status"] == "False" else None

        cond = wait_for(unreachable, timeout=30, message="BrokerReachable=False")
        assert cond["reason"].startswith("Broker")
        assert any(e.type == "Warning" and e.reason.startswith("Broker") for e in _events(k8s_api, namespace, "outage"))
        # Held, not scaled down, over several polls with the broker gone: every autoscaler tick counts
        # one broker error per failing pool, so six more errors mean several ticks saw this one down.
        errors = operator.metric("celery_fleet_broker_errors_total")
        wait_for(lambda: operator.metric("celery_fleet_broker_errors_total") >= errors + 6, timeout=30,
                 message="several failed polls")  # fmt: skip
        assert _tier_status(_get(k8s_api, namespace, "outage"), "high")["desiredReplicas"] == 3
        assert _replicas(k8s_api, namespace, "outage-high") == 3

        redis.start()
        wait_for(
            lambda: (_condition(_get(k8s_api, namespace, "outage"), "BrokerReachable") or {}).get("status") == "True",
            timeout=30,
            message="BrokerReachable=True after Redis returned",
        )
    finally:
        redis.stop()


def test_wrong_password_holds_and_never_leaks(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    right, wrong = f"right-{secrets.token_hex(6)}", f"wrong-{secrets.token_hex(6)}"
    redis = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=right)
    redis.start()
    try:
        bad_url = f"redis://:{wrong}@127.0.0.1:{redis.port}/0"
        client.CoreV1Api(k8s_api).create_namespaced_secret(
            namespace, {"metadata": {"name": "broker"}, "data": {"url": base64.b64encode(bad_url.encode()).decode()}}
        )
        _apply(cluster, namespace, _pool("auth", {"urlSecretRef": {"name": "broker", "key": "url"}}))

        def auth_failed() -> dict[str, Any] | None:
            cond = _condition(_get(k8s_api, namespace, "auth"), "BrokerReachable")
            return cond if cond and cond["status"] == "False" else None

        cond = wait_for(auth_failed, timeout=60, message="BrokerReachable=False for a wrong password")
        assert "Auth" in cond["reason"], cond
        assert _replicas(k8s_api, namespace, "auth-high") == 1

        published = [
            json.dumps(_get(k8s_api, namespace, "auth")),
            *(f"{e.reason} {e.message}" for e in _events(k8s_api, namespace, "auth")),
            operator.logs(),
            operator.metrics(),
        ]
        for secret in (wrong, right):
            assert not [p for p in published if secret in p]
    finally:
        redis.stop()
