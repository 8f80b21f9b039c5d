"""Worker and beat pods of a pool whose image runs as non-root pass the restricted Pod Security Standard.

The apiserver's PodSecurity admission decides, when the ReplicaSet controller creates the pods.
A pool that sets no security context is refused in the same namespace: the control that shows
the namespace really enforces the profile.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
# What a pool sets when its image runs as a numeric non-root user.
RESTRICTED: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    },
}
BASE: dict[str, Any] = {
    "app": "shop.celery:app",
    "image": "ghcr.io/example/celery-app:1.0",
    "broker": {"url": "redis://127.0.0.1:1/0"},  # unreachable: replicas are held, pods still made
}
TIERS = [
    {"name": "high", "queues": ["high"], "concurrency": 2, "replicas": {"min": 1, "max": 2}},
    {"name": "low", "queues": ["low"], "concurrency": 1, "pool": "threads", "replicas": {"min": 1, "max": 2}},
]


def _apply(cluster: Cluster, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pods(core: client.CoreV1Api, namespace: str, selector: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace, label_selector=selector).items)


def _refusals(core: client.CoreV1Api, namespace: str) -> list[str]:
    return [
        e.message
        for e in core.list_namespaced_event(namespace).items
        if e.reason == "FailedCreate" and "violates PodSecurity" in (e.message or "")
    ]


def test_restricted_namespace_admits_worker_and_beat_pods(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace,
        "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest",
    )  # fmt: skip
    core = client.CoreV1Api(k8s_api)
    _apply(cluster, namespace, "CeleryWorkerPool", "shop", {**BASE, **RESTRICTED, "tiers": TIERS})
    _apply(cluster, namespace, "CeleryBeat", "nightly", {**BASE, **RESTRICTED})
    _apply(cluster, namespace, "CeleryWorkerPool", "loose", {**BASE, "tiers": TIERS[:1]})

    def events() -> str:
        out = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout
        return f"{out[-4000:]}\noperator log:\n{operator.logs()[-2000:]}"

    for tier in ("high", "low"):
        wait_for(
            lambda tier=tier: _pods(core, namespace, f"celeryfleet.io/pool=shop,celeryfleet.io/tier={tier}"),
            timeout=180,
            message=lambda tier=tier: f"worker pods of tier {tier}: {events()}",
        )
    beat_pods = wait_for(
        lambda: len(pods := _pods(core, namespace, "celeryfleet.io/beat=nightly")) == 2 and pods,
        timeout=180,
        message=lambda: f"leader and standby beat pods: {events()}",
    )
    # The beat pod carries the operator's init container (the elector copy), admitted too.
    assert [c.name for c in beat_pods[0].spec.init_containers] == ["install-elector"]

    # The control: a pool with no security context gets no pods, by PodSecurity's decision.
    refusals = wait_for(lambda: _refusals(core, namespace), timeout=180, message=lambda: f"refusal: {events()}")
    assert any("loose-high" in m for m in refusals), refusals
    assert not _pods(core, namespace, "celeryfleet.io/pool=loose")
    assert not [m for m in refusals if "shop-" in m or "nightly-" in m], refusals
