"""The real operator, holding only the chart's ServiceAccount token, does the whole job and nothing more.

The chart is installed for one watched namespace; the operator runs as a local process with a
kubeconfig carrying that ServiceAccount's token (what the pod would get). It must reconcile a
pool (its broker URL from a Secret), scale it from real Redis depth, and reconcile a beat
(creating a Role, which RBAC allows only because it holds what the Role grants). Outside the
watched namespace the same token is refused.

These namespaces are deliberately outside this pytest session's prefix, so the session-wide
operator (admin credentials) never touches them: every write here is the ServiceAccount's.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.tools import tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHART = ROOT / "charts" / "celery-fleet"
GROUP, VERSION = "celeryfleet.io", "v1alpha1"


@dataclass(frozen=True)
class Install:
    release_ns: str
    watched: str
    unwatched: str
    service_account: str
    token_kubeconfig: Path


def token_kubeconfig(cluster: Cluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig for the admin's cluster entry, authenticated only by the ServiceAccount token."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    entry = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [entry],
                "users": [{"name": service_account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": entry["name"], "user": service_account}}],
                "current-context": "sa",
            }
        )
    )
    return path


@pytest.fixture
def install(cluster: Cluster, crds_installed: list[str], tmp_path: Path) -> Iterator[Install]:
    suffix = uuid.uuid4().hex[:6]
    release_ns, watched, unwatched = (f"sa-{role}-{suffix}" for role in ("operator", "work", "elsewhere"))
    for ns in (release_ns, watched, unwatched):
        cluster.kubectl("create", "namespace", ns)
    release = f"sa-{suffix}"
    helm = [str(tool("helm")), "--kubeconfig", str(cluster.kubeconfig)]
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"watchNamespaces": [watched], "crds": {"install": False}}))  # applied by the session
    subprocess.run(
        [*helm, "install", release, str(CHART), "-n", release_ns, "--values", str(values)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    service_account = f"{release}-celery-fleet"
    kubeconfig = token_kubeconfig(cluster, release_ns, service_account, tmp_path / "sa.kubeconfig")
    yield Install(release_ns, watched, unwatched, service_account, kubeconfig)
    subprocess.run([*helm, "uninstall", release, "-n", release_ns, "--wait"], capture_output=True, timeout=120)
    for ns in (release_ns, watched, unwatched):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def as_sa(cluster: Cluster, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _secret(name: str, url: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {"url": base64.b64encode(url.encode()).decode()},
    }


def _pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
            "tiers": [
                {"name": "work", "queues": ["work"], "concurrency": 1, "replicas": {"min": 1, "max": 4},
                 "autoscaling": {"targetDepthPerReplica": 5}, "podDisruptionBudget": {"maxUnavailable": 1}},
            ],
        },
    }  # fmt: skip


def _beat(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CeleryBeat",
        "metadata": {"name": name},
        "spec": {
            "app": "tasks:app",
            "image": "ghcr.io/example/celery-app:1.0",
            "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
        },
    }


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_service_account_operator_runs_the_full_flow_and_nothing_else(
    cluster: Cluster,
    k8s_api: client.ApiClient,
    install: Install,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    tmp_path: Path,
) -> None:
    ns = install.watched
    # The token really is the ServiceAccount (not admin), and Secrets are get-only where it works.
    who = as_sa(cluster, install.token_kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert who.stdout == f"system:serviceaccount:{install.release_ns}:{install.service_account}", who.stderr

    _apply(cluster, ns, _secret("broker", redis_server.url))
    _apply(cluster, install.unwatched, _secret("broker", redis_server.url))
    proc = OperatorProcess(install.token_kubeconfig, [ns], tmp_path / "operator.log", "--poll-interval", "0.5")
    proc.start()
    try:
        custom = client.CustomObjectsApi(k8s_api)
        apps = client.AppsV1Api(k8s_api)

        # Reconcile: the tier Deployment and its PodDisruptionBudget, the pool Ready.
        _apply(cluster, ns, _pool("shop"))

        def pool_ready() -> dict[str, Any] | None:
            pool = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "celeryworkerpools", "shop")
            ready = _condition(pool, "Ready")
            return pool if ready and ready["status"] == "True" else None

        wait_for(pool_ready, timeout=180, message=lambda: f"pool Ready; operator log:\n{proc.logs()[-3000:]}")
        assert apps.read_namespaced_deployment("shop-work", ns).spec.replicas == 1
        client.PolicyV1Api(k8s_api).read_namespaced_pod_disruption_budget("shop-work", ns)

        # Scale: 20 waiting messages at 5 per replica -> the tier's max of 4.
        redis_db.lpush("work", *[f"m{i}" for i in range(20)])
        wait_for(
            lambda: apps.read_namespaced_deployment("shop-work", ns).spec.replicas == 4,
            timeout=150,
            message=lambda: f"scale to 4; operator log:\n{proc.logs()[-3000:]}",
        )

        # Beat: ServiceAccount, Role (granting what the operator holds), RoleBinding, Lease, Deployment.
        _apply(cluster, ns, _beat("nightly"))
        wait_for(
            lambda: apps.read_namespaced_deployment("nightly-beat", ns) is not None,
            timeout=150,
            message=lambda: f"beat Deployment; operator log:\n{proc.logs()[-3000:]}",
        )
        role = client.RbacAuthorizationV1Api(k8s_api).read_namespaced_role("nightly-beat-lease", ns)
        assert role.rules[0].resource_names == ["nightly-beat"]
        client.CoordinationV1Api(k8s_api).read_namespaced_lease("nightly-beat", ns)
        beat = wait_for(
            lambda: custom.get_namespaced_custom_object(GROUP, VERSION, ns, "celerybeats", "nightly").get("status"),
            timeout=90,
            message="beat status written",
        )
        assert beat.get("conditions"), beat

        logs = proc.logs()
        assert "Forbidden" not in logs and " 403" not in logs, logs[-3000:]
    finally:
        proc.stop()

    # Refused outside its grant: another namespace's Secret, listing Secrets, escalation.
    refused = as_sa(cluster, install.token_kubeconfig, "get", "secret", "broker", "-n", install.unwatched)
    assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused
    listed = as_sa(cluster, install.token_kubeconfig, "get", "secrets", "-n", ns)
    assert listed.returncode != 0 and "Forbidden" in listed.stderr, listed
    for args in (
        ("create", "deployments.apps", "-n", install.unwatched),
        ("escalate", "roles.rbac.authorization.k8s.io", "-n", ns),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "pods", "-n", ns),
        ("update", "leases.coordination.k8s.io", "-n", "kube-system"),
    ):
        answer = as_sa(cluster, install.token_kubeconfig, "auth", "can-i", *args)
        assert answer.stdout.strip() == "no", f"can-i {' '.join(args)}: {answer.stdout}{answer.stderr}"
