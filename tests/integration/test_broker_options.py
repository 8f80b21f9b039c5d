"""spec.broker as users configure Celery, end to end through the operator (issue 14)."""

from __future__ import annotations

import json
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
QUEUE = "high_priority"


def pool(name: str, broker: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": broker,
            "tiers": [{"name": "high", "queues": [QUEUE], "concurrency": 4, "replicas": {"min": 1, "max": 8},
                       "autoscaling": {"targetDepthPerReplica": 100}}],
        },
    }  # fmt: skip


def get(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def tier_depth(obj: dict[str, Any]) -> int | None:
    tiers = (obj.get("status") or {}).get("tiers", [])
    return next((t.get("queueDepth") for t in tiers if t["name"] == "high"), None)


def test_unconfigured_priority_lists_are_named_then_read_once_configured(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, redis_db: Any,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    options = {"sep": ":", "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
    app = Celery("producer", broker=redis_server.url)
    app.conf.broker_transport_options = options
    for i in range(20):
        app.send_task("tasks.work", queue=QUEUE, priority=i % 10)
    with app.connection_for_read() as conn:
        truth = conn.default_channel._size(QUEUE)
    assert truth == 20
    app.close()

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool("layout", {"url": redis_server.url})))

    def mismatch() -> dict[str, Any] | None:
        c = condition(get(k8s_api, namespace, "layout"), "BrokerKeyLayout")
        return c if c and c["status"] == "False" else None

    c = wait_for(mismatch, timeout=60, message="BrokerKeyLayout=False naming the unread lists")
    assert c["reason"] == "UnreadPriorityLists" and "high_priority:1" in c["message"], c
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    assert any(e.reason == "BrokerKeyLayoutMismatch" and e.type == "Warning" for e in events)
    assert tier_depth(get(k8s_api, namespace, "layout")) == 2  # only the bare list: 2 of 20 (priority 0)

    fixed = {"url": redis_server.url, "sep": ":", "prioritySteps": list(range(10))}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool("layout", fixed)))

    def matches() -> dict[str, Any] | None:
        obj = get(k8s_api, namespace, "layout")
        c = condition(obj, "BrokerKeyLayout")
        return obj if c and c["status"] == "True" and tier_depth(obj) == truth else None

    wait_for(
        matches,
        timeout=60,
        message=lambda: (
            f"depth {truth} (kombu's _size) and BrokerKeyLayout=True; "
            f"last: {get(k8s_api, namespace, 'layout').get('status')}"
        ),
    )
