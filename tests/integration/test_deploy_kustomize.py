"""`kubectl apply -k deploy/` installs the operator; then `kubectl apply -f deploy/samples/` works.

The base installs into the fixed namespace celery-fleet with fixed ClusterRole names; on a
shared cluster the test removes what it installed except the CRDs (deleting those would delete
every pool and beat of every other test run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "deploy"
BASE_NAMESPACE = "celery-fleet"


def _built(cluster: Cluster) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(DEPLOY)).stdout) if d]


@pytest.fixture
def base_installed(cluster: Cluster, crds_installed: list[str]) -> Iterator[list[dict[str, object]]]:
    built = _built(cluster)
    yield built
    leftovers = [d for d in built if d["kind"] != "CustomResourceDefinition"]
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "List", "items": leftovers,
    }), check=False)  # fmt: skip


def test_apply_k_installs_the_operator_then_samples_apply(
    cluster: Cluster,
    k8s_api: client.ApiClient,
    base_installed: list[dict[str, object]],
    operator: OperatorProcess,
    namespace: str,
) -> None:
    applied = cluster.kubectl("apply", "-k", str(DEPLOY))
    kinds = sorted(str(d["kind"]) for d in base_installed)
    assert kinds == [
        "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
        "CustomResourceDefinition", "CustomResourceDefinition", "Deployment", "Namespace", "NetworkPolicy", "Role",
        "RoleBinding", "Service", "ServiceAccount",
    ], applied.stdout  # fmt: skip
    # The operator's pod is admitted by the base's own restricted namespace.
    core = client.CoreV1Api(k8s_api)
    wait_for(
        lambda: core.list_namespaced_pod(BASE_NAMESPACE, label_selector="app.kubernetes.io/name=celery-fleet").items,
        timeout=120,
        message=lambda: cluster.kubectl("get", "events", "-n", BASE_NAMESPACE).stdout,
    )
    answer = cluster.kubectl(
        "auth", "can-i", f"--as=system:serviceaccount:{BASE_NAMESPACE}:celery-fleet",
        "patch", "deployments.apps", "--subresource=scale", "-n", namespace, check=False,
    )  # fmt: skip
    assert answer.stdout.strip() == "yes"
    # Leader election between the replicas: their Lease, in the operator's own namespace.
    for verb in ("get", "update", "create"):
        answer = cluster.kubectl(
            "auth", "can-i", f"--as=system:serviceaccount:{BASE_NAMESPACE}:celery-fleet",
            verb, "leases.coordination.k8s.io", "-n", BASE_NAMESPACE, check=False,
        )  # fmt: skip
        assert answer.stdout.strip() == "yes", verb

    # The samples, as a user would apply them (into their own namespace).
    cluster.kubectl("apply", "-n", namespace, "-f", str(DEPLOY / "samples"))
    custom = client.CustomObjectsApi(k8s_api)
    pools = custom.list_namespaced_custom_object("celeryfleet.io", "v1alpha1", namespace, "celeryworkerpools")
    beats = custom.list_namespaced_custom_object("celeryfleet.io", "v1alpha1", namespace, "celerybeats")
    pool_names = sorted(p["metadata"]["name"] for p in pools["items"])
    beat_names = sorted(b["metadata"]["name"] for b in beats["items"])
    assert pool_names and beat_names

    # ...and the operator (this session's) turns them into workloads.
    apps = client.AppsV1Api(k8s_api)

    def deployments() -> set[str]:
        return {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items}

    # Each pool's first tier (its own names, or the default tiers' high).
    first_tiers = {
        p["metadata"]["name"]: ((p["spec"].get("tiers") or [{"name": "high"}])[0]["name"]) for p in pools["items"]
    }
    expected = {f"{p}-{t}" for p, t in first_tiers.items()} | {f"{b}-beat" for b in beat_names}
    wait_for(
        lambda: expected <= deployments(),
        timeout=180,
        message=lambda: f"{expected - deployments()} missing; operator log:\n{operator.logs()[-3000:]}",
    )
