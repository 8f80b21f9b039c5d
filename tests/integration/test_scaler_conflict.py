"""Issue 27: an HPA on a tier's Deployment, on the real apiserver with the real HPA controller.

The operator raises ScalerConflict and a Warning Event naming the HPA, and writes none of that
tier's replicas while it lasts (counted: the Deployment's generation does not move while the
autoscaler polls a backlog that would scale it), then takes the tier back once the HPA is gone.
Also: `kubectl get cwp` shows a Stalled pool as not Ready (the Ready condition, not pod counts).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"
KNOBS = {"targetDepthPerReplica": 100, "scaleDownStabilizationSeconds": 3, "scaleDownPeriodSeconds": 1}


def _pool(name: str, broker: dict[str, Any]) -> dict[str, Any]:
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
                 "replicas": {"min": 1, "max": 3}, "autoscaling": KNOBS},
                {"name": "low", "queues": ["low_priority"], "concurrency": 2,
                 "replicas": {"min": 1, "max": 2}, "autoscaling": KNOBS},
            ],
        },
    }  # fmt: skip


def _hpa(name: str, target: str, replicas: int) -> dict[str, Any]:
    # min = max: the HPA controller sets the count from its bounds alone (no metrics server here).
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": replicas,
            "maxReplicas": replicas,
        },
    }


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _get(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(pool: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (pool.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def _deployment(k8s_api: client.ApiClient, namespace: str, name: str) -> client.V1Deployment:
    return client.AppsV1Api(k8s_api).read_namespaced_deployment(name, namespace)


def _replicas(k8s_api: client.ApiClient, namespace: str, name: str) -> int:
    return int(_deployment(k8s_api, namespace, name).spec.replicas)


def test_an_hpa_on_a_tier_holds_it_with_a_condition_and_an_event_and_no_writes(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str, redis_db: Any,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    _apply(cluster, namespace, _pool("fight", {"url": redis_server.url}))
    wait_for(lambda: _replicas(k8s_api, namespace, "fight-high") == 1, timeout=120, message="high tier at min 1")

    # 5 is above the tier's max of 3: without the hold the operator would cut it back on every reconcile.
    _apply(cluster, namespace, _hpa("legacy", "fight-high", 5))

    def conflict() -> dict[str, Any] | None:
        c = _condition(_get(k8s_api, namespace, "fight"), "ScalerConflict")
        return c if c and c["status"] == "True" else None

    condition = wait_for(conflict, timeout=60, message="ScalerConflict=True")
    assert condition["reason"] == "OtherAutoscaler"
    assert "tier high (Deployment fight-high) is also scaled by HorizontalPodAutoscaler legacy" in condition["message"]
    core = client.CoreV1Api(k8s_api)
    wait_for(
        lambda: [e for e in core.list_namespaced_event(namespace).items
                 if e.involved_object.name == "fight" and e.reason == "ScalerConflict" and e.type == "Warning"],
        timeout=30, message="a Warning Event ScalerConflict",
    )  # fmt: skip
    wait_for(lambda: _replicas(k8s_api, namespace, "fight-high") == 5, timeout=60, message="the HPA's count (5)")
    generation = _deployment(k8s_api, namespace, "fight-high").metadata.generation

    # A backlog on both tiers: the autoscaler acts on low (so it has polled and decided) but not on high.
    redis_db.lpush("high_priority", *[json.dumps({"n": i}) for i in range(300)])
    redis_db.lpush("low_priority", *[json.dumps({"n": i}) for i in range(300)])
    wait_for(lambda: _replicas(k8s_api, namespace, "fight-low") == 2, timeout=60, message="low tier scaled to 2")

    def high_seen() -> bool:
        tiers = (_get(k8s_api, namespace, "fight").get("status") or {}).get("tiers", [])
        return any(t["name"] == "high" and t.get("queueDepth") == 300 for t in tiers)

    wait_for(high_seen, timeout=60, message="the high tier's backlog read by the autoscaler")
    # Reconciles too: a spec change makes the reconciler apply every tier's Deployment again.
    tiers = [{**t, "concurrency": 5} for t in _pool("fight", {})["spec"]["tiers"]]
    cluster.kubectl("patch", "cwp", "fight", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"tiers": tiers}}))  # fmt: skip
    wait_for(
        lambda: (_get(k8s_api, namespace, "fight").get("status") or {}).get("observedGeneration") == 2,
        timeout=60, message="the changed spec reconciled",
    )  # fmt: skip
    dep = _deployment(k8s_api, namespace, "fight-high")
    # One write (the template's new concurrency), none of spec.replicas: the count is still the HPA's.
    assert (dep.spec.replicas, dep.metadata.generation) == (5, generation + 1)

    # The HPA goes: the condition clears and the operator takes the tier back to its own count (max 3).
    cluster.kubectl("delete", "hpa", "legacy", "-n", namespace)
    wait_for(
        lambda: (_condition(_get(k8s_api, namespace, "fight"), "ScalerConflict") or {}).get("status") == "False",
        timeout=60, message="ScalerConflict=False",
    )  # fmt: skip
    wait_for(lambda: _replicas(k8s_api, namespace, "fight-high") == 3, timeout=60, message="back to the tier's max 3")


def test_kubectl_get_shows_a_stalled_pool_not_ready(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    _apply(cluster, namespace, _pool("stalled", {"urlSecretRef": {"name": "missing", "key": "url"}}))
    wait_for(
        lambda: (_condition(_get(k8s_api, namespace, "stalled"), "Stalled") or {}).get("status") == "True",
        timeout=60, message="Stalled=True",
    )  # fmt: skip
    crd = ROOT / "crds" / "celeryfleet.io_celeryworkerpools.yaml"

    def table() -> list[str] | None:
        # The cluster is shared: another checkout's session may have applied its own CRD since ours.
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        out = cluster.kubectl("get", "cwp", "stalled", "-n", namespace, "-o", "wide").stdout.splitlines()
        return out if out[0].split()[:3] == ["NAME", "READY", "PODS"] else None

    out = wait_for(table, timeout=30, message="kubectl get cwp with this checkout's printer columns")
    # Columns by their header's offsets: an empty cell (BUSY, no tier counted yet) prints as blanks.
    starts = [out[0].index(name) for name in out[0].split()]
    cells = {
        name: out[1][start:end].strip()
        for name, start, end in zip(out[0].split(), starts, [*starts[1:], None], strict=True)
    }
    assert (cells["NAME"], cells["READY"], cells["REASON"]) == ("stalled", "False", "BrokerSecretMissing"), out


KEDA_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {
        "group": "keda.sh",
        "names": {"kind": "ScaledObject", "listKind": "ScaledObjectList", "plural": "scaledobjects",
                  "singular": "scaledobject"},
        "scope": "Namespaced",
        # Only what the operator reads; KEDA's own CRD is larger.
        "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip


def test_a_keda_scaled_object_is_seen_once_its_crd_exists_and_a_paused_one_is_not(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, redis_db: Any,
) -> None:  # fmt: skip
    # redis_db flushes the shared Redis: the HPA test's backlog on the same queue names would scale kd up.
    created = cluster.kubectl("get", "crd", "scaledobjects.keda.sh", check=False).returncode != 0
    if created:  # the operator started without it: Kopf starts the watch when it appears
        _apply(cluster, "default", KEDA_CRD)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/scaledobjects.keda.sh")
    try:
        _apply(cluster, namespace, _pool("kd", {"url": redis_server.url}))
        wait_for(lambda: _replicas(k8s_api, namespace, "kd-low") == 1, timeout=120, message="low tier created")
        scaled_object = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "old"},
                         "spec": {"scaleTargetRef": {"name": "kd-low"}}}  # fmt: skip
        _apply(cluster, namespace, scaled_object)

        def conflict_status() -> str | None:
            c = _condition(_get(k8s_api, namespace, "kd"), "ScalerConflict")
            return None if c is None else f"{c['status']}: {c['message']}"

        expected = "True: tier low (Deployment kd-low) is also scaled by ScaledObject old"
        wait_for(lambda: (conflict_status() or "").startswith(expected), timeout=60,
                 message=lambda: f"ScalerConflict naming the ScaledObject: {conflict_status()}")  # fmt: skip
        # The migration guide's first step: pause it. A paused ScaledObject writes nothing.
        cluster.kubectl("annotate", "scaledobject", "old", "-n", namespace, "autoscaling.keda.sh/paused=true")
        wait_for(lambda: (conflict_status() or "").startswith("False"), timeout=60,
                 message=lambda: f"ScalerConflict cleared: {conflict_status()}")  # fmt: skip
    finally:
        if created:
            cluster.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=false", check=False)
