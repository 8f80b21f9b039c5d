"""Issue 13: one operator, many teams' namespaces, every team hostile to the others.

Item 1: object names cannot reach another namespace (admission, then the client itself).
Item 5: the operator never takes over an object of the same name that it did not create.
Item 9: a deleted pool's or beat's metrics go with it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from celery_fleet.kube.client import ApiError, Kube
from tests.support.cluster import Cluster
from tests.support.faults import beat_manifest, broker_secret, own_namespace, pool_manifest

pytestmark = pytest.mark.integration

OTHER_PASSWORD = "other-teams-s3cret"


def _server_dry_run(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> str:
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    return proc.stderr if proc.returncode else ""


# -- item 1: path traversal --------------------------------------------------------------------------------

TRAVERSING_NAMES = [
    pytest.param(["broker"], {"urlSecretRef": {"name": "../../{other}/secrets/redis", "key": "url"}},
                 "spec.broker.urlSecretRef.name", id="broker-secret"),
    pytest.param(["serviceAccountName"], "../../{other}/serviceaccounts/default", "spec.serviceAccountName",
                 id="service-account"),
    pytest.param(["priorityClassName"], "../x", "spec.priorityClassName", id="priority-class"),
    pytest.param(["imagePullSecrets"], [{"name": "../../{other}/secrets/regcred"}], "spec.imagePullSecrets[0].name",
                 id="pull-secret"),
    pytest.param(["env"], [{"name": "U", "valueFrom": {"secretKeyRef": {"name": "../{other}", "key": "k"}}}],
                 "spec.env[0].valueFrom.secretKeyRef.name", id="env-secret"),
    pytest.param(["envFrom"], [{"configMapRef": {"name": "a/b"}}], "spec.envFrom[0].configMapRef.name",
                 id="env-from-config-map"),
    pytest.param(["volumes"], [{"name": "v", "secret": {"secretName": "../../{other}/secrets/redis"}}],
                 "spec.volumes[0].secret.secretName", id="volume-secret"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "field"), TRAVERSING_NAMES)
@pytest.mark.parametrize("kind", ["pool", "beat"])
def test_names_that_leave_the_namespace_are_refused_at_admission(
    cluster: Cluster, crds_installed: list[str], namespace: str, kind: str, path: list[str], value: Any, field: str
) -> None:
    broker = {"url": "redis://redis:6379/0"}
    obj = pool_manifest("shop", broker) if kind == "pool" else beat_manifest("shop", broker)
    obj["spec"][path[0]] = json.loads(json.dumps(value).replace("{other}", "team-b"))
    error = _server_dry_run(cluster, namespace, obj)
    assert field in error, error
    assert "Kubernetes object name" in error or "should match" in error, error


def test_the_client_cannot_be_made_to_read_another_namespace(
    cluster: Cluster, k8s_api: client.ApiClient, namespace: str
) -> None:
    """Bypassing admission: the name reaches the client as is, and stays one path segment."""
    kube = Kube(k8s_api)
    with own_namespace(cluster, "victim") as other:
        broker_secret(k8s_api, other, "redis", {"url": f"redis://:{OTHER_PASSWORD}@redis.{other}:6379/0"})
        traversal = f"../../{other}/secrets/redis"
        # The attack is real: an unescaped path climbs into the other namespace.
        raw = kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{traversal}")
        assert raw["metadata"]["namespace"] == other
        # Through the client it is one name in our own namespace: no such Secret, or not a valid name.
        for sneaky in (
            traversal,
            f"..%2F..%2F{other}%2Fsecrets%2Fredis",
            f"redis?namespace={other}",
            f"x/../../{other}",
        ):
            try:
                assert kube.secret_value(namespace, sneaky, "url") is None, sneaky
            except ApiError as err:
                assert err.status == 400 and OTHER_PASSWORD not in str(err), (sneaky, err)
        with pytest.raises(ValueError, match="not an object name"):
            kube.secret_value(namespace, "..", "url")
        assert kube.get("v1", "Secret", f"{namespace}/../{other}", "redis") is None
