"""Issue 26: the real operator turns a pool with three differently placed tiers, a sidecar overlay and a
command prefix (deploy/samples/pool-placement.yaml) into Deployments that carry them; the real
apiserver refuses an overlay that would change the worker's node name, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubernetes import client

from celery_fleet.api.models import GROUP, VERSION
from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

PLURAL = "celeryworkerpools"


def _sample() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "samples" / "pool-placement.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "CeleryWorkerPool")


def test_three_placed_tiers_with_a_sidecar_and_a_command_prefix_become_their_deployments(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    pool = _sample()
    name = pool["metadata"]["name"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))
    apps = client.AppsV1Api(k8s_api)

    def deployments() -> dict[str, Any] | None:
        items = apps.list_namespaced_deployment(namespace, label_selector=f"celeryfleet.io/pool={name}").items
        found = {d.metadata.labels["celeryfleet.io/tier"]: k8s_api.sanitize_for_serialization(d) for d in items}
        return found if set(found) == {"gpu", "default", "spot"} else None

    deps = wait_for(deployments, timeout=60, message=f"three Deployments of {namespace}/{name}")
    pods = {tier: d["spec"]["template"]["spec"] for tier, d in deps.items()}
    workers = {tier: pod["containers"][0] for tier, pod in pods.items()}

    # Placement: per tier, over the pool's (nodeSelector merged by key, tolerations replaced).
    assert workers["gpu"]["image"] == "ghcr.io/example/celery-app:1.0-cuda"
    assert workers["default"]["image"] == workers["spot"]["image"] == "ghcr.io/example/celery-app:1.0"
    assert pods["gpu"]["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "cloud.google.com/gke-accelerator": "nvidia-l4",
    }
    assert pods["default"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pods["spot"]["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert [t["key"] for t in pods["gpu"]["tolerations"]] == ["nvidia.com/gpu"]
    assert "tolerations" not in pods["default"]
    assert pods["gpu"]["priorityClassName"] == "media-gpu"
    assert pods["spot"]["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert deps["spot"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": "25%"}
    assert deps["gpu"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert {e["name"]: e.get("value") for e in workers["gpu"]["env"]}["DD_SERVICE"] == "media-gpu"
    assert {e["name"]: e.get("value") for e in workers["default"]["env"]}["DD_SERVICE"] == "media"

    # The overlay and the wrapper, in every tier; the scale-in model's options untouched.
    for tier, pod in pods.items():
        assert [c["name"] for c in pod["containers"]] == ["worker", "cloud-sql-proxy"], tier
        assert pod["hostAliases"] == [{"ip": "10.0.0.10", "hostnames": ["legacy-api.internal"]}]
        worker = workers[tier]
        assert worker["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "2"]
        assert worker["command"] == ["ddtrace-run", "celery"]
        args = worker["args"]
        assert args[args.index("--hostname") + 1] == "celery@$(POD_NAME)"
        assert ("--task-events" in args, "--without-heartbeat" in args) == (tier == "gpu", tier != "gpu")


@pytest.mark.parametrize(
    ("overlay", "field", "says"),
    [
        pytest.param(
            {"spec": {"containers": [{"name": "worker", "args": ["-n", "me@%h"]}]}},
            "spec.podTemplate.spec.containers[0].args",
            "args of the worker container is set by the operator",
            id="worker-args",
        ),
        pytest.param(
            {"metadata": {"labels": {"celeryfleet.io/tier": "other"}}},
            "spec.podTemplate.metadata.labels",
            "label celeryfleet.io/tier selects the tier's pods",
            id="selector-label",
        ),
    ],
)
def test_an_overlay_that_breaks_the_model_is_refused_at_admission(
    k8s_api: client.ApiClient, crds_installed: list[str], namespace: str, overlay: dict[str, Any], field: str, says: str
) -> None:
    pool = _sample()
    pool["spec"]["podTemplate"] = overlay
    with pytest.raises(client.ApiException) as refused:
        client.CustomObjectsApi(k8s_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, pool, dry_run="All"
        )
    causes = json.loads(refused.value.body)["details"]["causes"]
    assert any(c["field"] == field and says in c["message"] for c in causes), causes
