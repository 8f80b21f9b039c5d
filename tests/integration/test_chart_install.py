"""`helm install` of the chart into the local cluster creates everything; `helm uninstall` leaves nothing.

The operator pod itself only "runs" on a kwok node (no container starts), which is enough to
show the apiserver admits it under the restricted Pod Security Standard.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import ROOT, Cluster
from tests.support.tools import tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHART = ROOT / "charts" / "celery-fleet"
NO_CRDS = ("--set", "crds.install=false")
NAMESPACED_KINDS = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,configmaps"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(tool("helm")), "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=360
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc


def names(cluster: Cluster, kinds: str, selector: str, namespace: str | None = None) -> list[str]:
    scope = ["-n", namespace] if namespace else []
    out = cluster.kubectl("get", kinds, *scope, "-l", selector, "-o", "name").stdout
    return sorted(out.split())


def can_i(cluster: Cluster, user: str, *args: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", f"--as={user}", *args, check=False)
    return proc.stdout.strip() == "yes"


@pytest.fixture
def release(cluster: Cluster, namespace: str, crds_installed: list[str]) -> Iterator[tuple[str, str]]:
    """A release name unique to this test (its ClusterRoles are cluster-wide) in a restricted namespace."""
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    name = f"cf-{uuid.uuid4().hex[:6]}"
    yield name, namespace
    helm(cluster, "uninstall", name, "-n", namespace, "--wait", check=False)


def test_install_creates_everything_and_uninstall_leaves_nothing(cluster: Cluster, release: tuple[str, str]) -> None:
    name, namespace = release
    fullname = f"{name}-celery-fleet"
    selector = f"app.kubernetes.io/instance={name}"
    # The session's CRDs are already applied (not by Helm): the chart leaves them to that.
    proc = helm(cluster, "install", name, str(CHART), "-n", namespace, *NO_CRDS, "--wait", "--timeout", "300s")
    assert "kubectl get celeryworkerpools" in proc.stdout, "NOTES.txt tells the user what to do next"

    assert names(cluster, "clusterroles,clusterrolebindings", selector) == sorted(
        [
            *(
                f"{kind}.rbac.authorization.k8s.io/{n}"
                for kind in ("clusterrole", "clusterrolebinding")
                for n in (fullname, f"{fullname}-cluster")
            ),
            # Users' roles, aggregated into admin/edit/view (bound by nobody directly).
            f"clusterrole.rbac.authorization.k8s.io/{fullname}-edit",
            f"clusterrole.rbac.authorization.k8s.io/{fullname}-view",
        ]
    )
    assert names(cluster, "deployments,services,serviceaccounts", selector, namespace) == [
        f"deployment.apps/{fullname}",
        f"service/{fullname}-metrics",
        f"serviceaccount/{fullname}",
    ]
    # The restricted namespace admitted the operator's two pods (leader and standby; the ReplicaSet
    # controller created them).
    wait_for(
        lambda: len(names(cluster, "pods", selector, namespace)) == 2,
        timeout=120,
        message=lambda: cluster.kubectl("get", "events", "-n", namespace).stdout,
    )
    sa = f"system:serviceaccount:{namespace}:{fullname}"
    for verb in ("get", "update", "create"):
        assert can_i(cluster, sa, verb, "leases.coordination.k8s.io", "-n", namespace), verb
    for crd in ("celeryworkerpools.celeryfleet.io", "celerybeats.celeryfleet.io"):
        cluster.kubectl("get", "crd", crd)

    # Cluster-wide grant: every namespace, Secrets by name only.
    assert can_i(cluster, sa, "patch", "deployments.apps", "--subresource=scale", "-n", "default")
    assert can_i(cluster, sa, "get", "secrets", "-n", "default")
    assert not can_i(cluster, sa, "list", "secrets", "-n", "default")
    assert not can_i(cluster, sa, "escalate", "roles.rbac.authorization.k8s.io", "-n", "default")
    assert not can_i(cluster, sa, "create", "pods", "-n", "default")

    helm(cluster, "uninstall", name, "-n", namespace, "--wait")
    assert names(cluster, "clusterroles,clusterrolebindings", selector) == []
    wait_for(
        lambda: names(cluster, NAMESPACED_KINDS, selector, namespace) == [],
        timeout=120,
        message=lambda: f"objects left after uninstall: {names(cluster, NAMESPACED_KINDS, selector, namespace)}",
    )
    assert helm(cluster, "list", "-n", namespace, "-q").stdout.strip() == ""
    # The CRDs stay (Helm never deletes CRDs: that would delete every pool and beat).
    cluster.kubectl("get", "crd", "celeryworkerpools.celeryfleet.io")


def test_install_for_listed_namespaces_grants_only_there(
    cluster: Cluster, release: tuple[str, str], tmp_path: Path
) -> None:
    name, release_ns = release
    fullname = f"{name}-celery-fleet"
    watched = f"{release_ns[:50]}-w"
    cluster.kubectl("create", "namespace", watched)
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"watchNamespaces": [watched], "rbac": {"brokerSecretNames": ["shop-broker"]}}))
    try:
        helm(cluster, "install", name, str(CHART), "-n", release_ns, "--values", str(values), *NO_CRDS)
        sa = f"system:serviceaccount:{release_ns}:{fullname}"
        selector = f"app.kubernetes.io/instance={name}"
        assert names(cluster, "roles,rolebindings", selector, watched) == [
            f"role.rbac.authorization.k8s.io/{fullname}",
            f"rolebinding.rbac.authorization.k8s.io/{fullname}",
        ]
        assert names(cluster, "clusterroles", selector) == [
            f"clusterrole.rbac.authorization.k8s.io/{fullname}{suffix}" for suffix in ("-cluster", "-edit", "-view")
        ]
        assert can_i(cluster, sa, "get", "secrets/shop-broker", "-n", watched)
        assert not can_i(cluster, sa, "get", "secrets/db-password", "-n", watched)
        assert not can_i(cluster, sa, "get", "secrets/shop-broker", "-n", "default")
        assert can_i(cluster, sa, "create", "deployments.apps", "-n", watched)
        assert not can_i(cluster, sa, "create", "deployments.apps", "-n", "default")
        assert can_i(cluster, sa, "watch", "namespaces")
    finally:
        helm(cluster, "uninstall", name, "-n", release_ns, "--wait", check=False)
        cluster.kubectl("delete", "namespace", watched, "--wait=false", check=False)
    assert names(cluster, "roles,rolebindings", f"app.kubernetes.io/instance={name}", watched) == []
