"""The local control plane is real: controllers, scheduler, kwok, GC, RBAC, Leases; Redis is real."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.support.cluster import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def _deployment(name: str, replicas: int) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/fake:1"}]},
            },
        },
    }


def _pods(core: client.CoreV1Api, ns: str, app: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(ns, label_selector=f"app={app}").items)


def test_deployment_pods_run_on_kwok_nodes_and_are_garbage_collected(k8s_api, namespace: str) -> None:
    apps, core = client.AppsV1Api(k8s_api), client.CoreV1Api(k8s_api)
    apps.create_namespaced_deployment(namespace, _deployment("web", 3))

    def running() -> list[client.V1Pod] | None:
        pods = _pods(core, namespace, "web")
        ok = len(pods) == 3 and all(p.status.phase == "Running" and p.spec.node_name for p in pods)
        return pods if ok else None

    pods = wait_for(running, timeout=60, message="3 Running pods scheduled on nodes")
    nodes = {n.metadata.name: n for n in core.list_node().items}
    for pod in pods:
        node = nodes[pod.spec.node_name]
        # kwok-managed fake nodes carry this annotation; a pod "Running" there proves scheduler + kwok.
        assert node.metadata.annotations.get("kwok.x-k8s.io/node") == "fake", node.metadata.annotations
    replicasets = apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
    assert len(replicasets) == 1
    assert replicasets[0].metadata.owner_references[0].kind == "Deployment"

    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
            and not _pods(core, namespace, "web")
        ),
        timeout=60,
        message="ReplicaSet and Pods garbage-collected after the Deployment was deleted",
    )


def test_rbac_is_enforced_for_service_accounts(cluster: Cluster, k8s_api, namespace: str) -> None:
    core, rbac = client.CoreV1Api(k8s_api), client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    who = f"system:serviceaccount:{namespace}:reader"

    denied = cluster.kubectl("get", "deployments", "-n", namespace, "--as", who, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and 'cannot list resource "deployments"' in denied.stderr

    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "deploy-reader"},
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "deploy-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deploy-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    wait_for(
        lambda: cluster.kubectl("get", "deployments", "-n", namespace, "--as", who, check=False).returncode == 0,
        timeout=30,
        message="the Role to take effect",
    )
    # The grant is exactly what the Role says: secrets stay forbidden.
    secrets = cluster.kubectl("get", "secrets", "-n", namespace, "--as", who, check=False)
    assert secrets.returncode != 0 and "Forbidden" in secrets.stderr


def test_lease_optimistic_concurrency(k8s_api, namespace: str) -> None:
    coord = client.CoordinationV1Api(k8s_api)
    created = coord.create_namespaced_lease(
        namespace,
        {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}},
    )
    stale_version = created.metadata.resource_version

    lease = coord.read_namespaced_lease("leader", namespace)
    lease.spec.holder_identity = "b"
    updated = coord.replace_namespaced_lease("leader", namespace, lease)
    assert updated.spec.holder_identity == "b"
    assert updated.metadata.resource_version != stale_version

    stale = {
        "metadata": {"name": "leader", "resourceVersion": stale_version},
        "spec": {"holderIdentity": "c", "leaseDurationSeconds": 15},
    }
    with pytest.raises(ApiException) as err:
        coord.replace_namespaced_lease("leader", namespace, stale)
    assert err.value.status == 409
    assert json.loads(err.value.body)["reason"] == "Conflict"
    assert coord.read_namespaced_lease("leader", namespace).spec.holder_identity == "b"


def test_redis_round_trip(redis_db) -> None:
    key = f"k-{uuid.uuid4().hex}"
    redis_db.rpush(key, "a", "b")
    assert redis_db.llen(key) == 2
    assert redis_db.lpop(key) == b"a"
    assert redis_db.info("server")["redis_version"]
