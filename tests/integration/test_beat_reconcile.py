"""Issue 6, operator side: a CeleryBeat becomes SA, Role, RoleBinding, Lease, Deployment; status follows the Lease."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celerybeats"


def _beat_sample() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "samples" / "beat.yaml").read_text()) if d]
    return next(d for d in docs if d["kind"] == "CeleryBeat")


def _get(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_beat_objects_rbac_and_leader_status(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    beat = _beat_sample()
    name = beat["metadata"]["name"]
    beat["spec"]["lease"] = {"durationSeconds": 4, "renewDeadlineSeconds": 3, "retryPeriodSeconds": 1}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(beat))

    apps, core = client.AppsV1Api(k8s_api), client.CoreV1Api(k8s_api)
    rbac, coord = client.RbacAuthorizationV1Api(k8s_api), client.CoordinationV1Api(k8s_api)
    dep = wait_for(lambda: apps.read_namespaced_deployment(f"{name}-beat", namespace), timeout=30,
                   message="beat Deployment")  # fmt: skip
    assert dep.spec.strategy.type == "Recreate"
    assert dep.spec.replicas == 1 + beat["spec"].get("standby", 1)
    command = dep.spec.template.spec.containers[0].command
    assert "--lease" in command and f"{name}-beat" in command and "beat" in command
    assert dep.spec.template.spec.init_containers[0].name == "install-elector"
    sa = core.read_namespaced_service_account(f"{name}-beat", namespace)
    role = rbac.read_namespaced_role(f"{name}-beat-lease", namespace)
    binding = rbac.read_namespaced_role_binding(f"{name}-beat-lease", namespace)
    lease = wait_for(lambda: coord.read_namespaced_lease(f"{name}-beat", namespace), timeout=30, message="Lease")
    for obj in (dep, sa, role, binding, lease):
        assert obj.metadata.owner_references[0].kind == "CeleryBeat", obj.metadata

    # The pods' identity may use its own Lease and nothing else.
    who = f"system:serviceaccount:{namespace}:{sa.metadata.name}"
    assert cluster.kubectl("auth", "can-i", "update", f"lease/{name}-beat", "-n", namespace, "--as", who,
                           check=False).stdout.strip() == "yes"  # fmt: skip
    for verb, resource in (("get", "secrets"), ("list", "pods"), ("create", "leases"), ("update", "lease/other")):
        answer = cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", who, check=False)
        assert answer.stdout.strip() == "no", (verb, resource, answer.stdout)
    refused = cluster.kubectl("get", "secrets", "-n", namespace, "--as", who, check=False)
    assert refused.returncode != 0 and "Forbidden" in refused.stderr

    # A holder (written with the pods' own identity, as the elector would) makes the beat Ready.
    current = json.loads(cluster.kubectl("get", "lease", f"{name}-beat", "-n", namespace, "--as", who,
                                         "-o", "json").stdout)  # fmt: skip
    current["spec"] = {"holderIdentity": f"{name}-beat-pod-a", "leaseDurationSeconds": 4,
                       "renewTime": _now(), "acquireTime": _now(), "leaseTransitions": 1}  # fmt: skip
    cluster.kubectl("replace", "-n", namespace, "--as", who, "-f", "-", input=json.dumps(current))
    ready = wait_for(
        lambda: (b := _get(k8s_api, namespace, name)) and _condition(b, "Ready").get("status") == "True" and b,
        timeout=20,
        message="beat Ready with a leader",
    )
    assert ready["status"]["leader"] == f"{name}-beat-pod-a"
    assert ready["status"]["leaseTransitions"] == 1
    events = [e for e in core.list_namespaced_event(namespace).items if e.involved_object.name == name]
    assert any(e.reason == "LeaderElected" and "pod-a" in e.message for e in events)

    # Nobody renews: after the lease duration the beat is Degraded, NoLeader.
    degraded = wait_for(
        lambda: (b := _get(k8s_api, namespace, name)) and _condition(b, "Degraded").get("status") == "True" and b,
        timeout=30,
        message="Degraded NoLeader once the lease expired",
    )
    assert _condition(degraded, "Degraded")["reason"] == "NoLeader"
    assert degraded["status"]["leader"] == ""
