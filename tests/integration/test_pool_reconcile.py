"""Issue 4: the real operator reconciles CeleryWorkerPools into per-tier Deployments."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

SAMPLES = ROOT / "deploy" / "samples"
GROUP, VERSION, PLURAL = "celeryfleet.io", "v1alpha1", "celeryworkerpools"


def _sample(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((SAMPLES / name).read_text()) if d]
    return next(d for d in docs if d["kind"] == "CeleryWorkerPool")


def _apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pool(k8s_api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(k8s_api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(pool: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (pool.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None


def wait_ready(k8s_api: client.ApiClient, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pool = _pool(k8s_api, namespace, name)
        cond = _condition(pool, "Ready")
        current = (pool.get("status") or {}).get("observedGeneration") == pool["metadata"]["generation"]
        return pool if current and cond and cond["status"] == "True" else None

    return wait_for(
        ready, timeout=timeout, message=lambda: f"pool {namespace}/{name} Ready: {_pool(k8s_api, namespace, name)}"
    )


def _deployments(k8s_api: client.ApiClient, namespace: str, pool: str) -> dict[str, client.V1Deployment]:
    apps = client.AppsV1Api(k8s_api)
    items = apps.list_namespaced_deployment(namespace, label_selector=f"celeryfleet.io/pool={pool}").items
    return {d.metadata.labels["celeryfleet.io/tier"]: d for d in items}


def _events(k8s_api: client.ApiClient, namespace: str, name: str) -> list[client.CoreV1Event]:
    core = client.CoreV1Api(k8s_api)
    return [e for e in core.list_namespaced_event(namespace).items if e.involved_object.name == name]


def test_default_tiers_become_three_deployments_and_ready(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    pool = _sample("pool-minimal.yaml")
    _apply(cluster, namespace, pool)
    name = pool["metadata"]["name"]
    ready = wait_ready(k8s_api, namespace, name)

    deps = _deployments(k8s_api, namespace, name)
    assert set(deps) == {"high", "medium", "low"}
    expected = {
        "high": ("high_priority", "4", 2),
        "medium": ("medium_priority,celery", "6", 4),  # and Celery's default queue
        "low": ("low_priority", "2", 1),
    }
    for tier, (queue, concurrency, replicas) in expected.items():
        d = deps[tier]
        assert d.metadata.name == f"{name}-{tier}"
        assert d.spec.replicas == replicas
        labels = d.metadata.labels
        assert labels["app.kubernetes.io/managed-by"] == "celery-fleet"
        assert labels["app.kubernetes.io/instance"] == name
        assert labels["app.kubernetes.io/component"] == "worker"
        assert d.metadata.owner_references[0].kind == "CeleryWorkerPool"
        assert d.spec.strategy.rolling_update.max_unavailable in (0, "0")
        container = d.spec.template.spec.containers[0]
        args = container.args
        assert container.command == ["celery"]
        assert args[args.index("-Q") + 1] == queue
        assert args[args.index("--concurrency") + 1] == concurrency
        for flag in ("--without-gossip", "--without-mingle", "--without-heartbeat", "--prefetch-multiplier"):
            assert flag in args
        assert "celery@$(POD_NAME)" in args
        env = {e.name: e for e in container.env}
        assert env["CELERY_BROKER_URL"].value == pool["spec"]["broker"]["url"]
        assert env["POD_NAME"].value_from.field_ref.field_path == "metadata.name"
    tiers = {t["name"]: t for t in ready["status"]["tiers"]}
    assert tiers["medium"]["readyReplicas"] == 4
    reasons = {e.reason for e in _events(k8s_api, namespace, name)}
    assert "Created" in reasons


def test_changes_roll_one_tier_and_children_are_restored(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    pool = _sample("pool-minimal.yaml")
    name = pool["metadata"]["name"]
    _apply(cluster, namespace, pool)
    wait_ready(k8s_api, namespace, name)
    before = {t: d.spec.template.metadata.annotations["celeryfleet.io/config-hash"] for t, d in
              _deployments(k8s_api, namespace, name).items()}  # fmt: skip

    # Change one tier's concurrency: only that tier's pod template changes.
    patched = _pool(k8s_api, namespace, name)
    tiers = patched["spec"]["tiers"]
    next(t for t in tiers if t["name"] == "medium")["concurrency"] = 9
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"tiers": tiers}}
    )

    def rolled() -> dict[str, str] | None:
        deps = _deployments(k8s_api, namespace, name)
        hashes = {t: d.spec.template.metadata.annotations["celeryfleet.io/config-hash"] for t, d in deps.items()}
        args = deps["medium"].spec.template.spec.containers[0].args
        return hashes if args[args.index("--concurrency") + 1] == "9" else None

    after = wait_for(rolled, timeout=30, message="medium tier rolled to concurrency 9")
    assert after["medium"] != before["medium"]
    assert after["high"] == before["high"] and after["low"] == before["low"]
    wait_ready(k8s_api, namespace, name)

    # Delete a child by hand: restored.
    apps.delete_namespaced_deployment(f"{name}-high", namespace)
    wait_for(
        lambda: (
            "high" in _deployments(k8s_api, namespace, name)
            and _deployments(k8s_api, namespace, name)["high"].metadata.deletion_timestamp is None
        ),
        timeout=30,
        message="deleted high Deployment restored",
    )

    # Edit a child's container args by hand: reverted.
    dep = apps.read_namespaced_deployment(f"{name}-low", namespace)
    original_args = list(dep.spec.template.spec.containers[0].args)
    apps.patch_namespaced_deployment(
        f"{name}-low",
        namespace,
        [{"op": "replace", "path": "/spec/template/spec/containers/0/args", "value": ["-A", "hacked", "worker"]}],
    )
    wait_for(
        lambda: (
            apps.read_namespaced_deployment(f"{name}-low", namespace).spec.template.spec.containers[0].args
            == original_args
        ),
        timeout=30,
        message="hand-edited args reverted",
    )

    # Remove a tier: its Deployment goes.
    tiers = [t for t in _pool(k8s_api, namespace, name)["spec"]["tiers"] if t["name"] != "low"]
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"tiers": tiers}}
    )
    wait_for(lambda: set(_deployments(k8s_api, namespace, name)) == {"high", "medium"}, timeout=30,
             message="low tier Deployment deleted")  # fmt: skip
    assert any(e.reason == "Deleted" for e in _events(k8s_api, namespace, name))

    # Delete the pool: the garbage collector removes every child.
    client.CustomObjectsApi(k8s_api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: not _deployments(k8s_api, namespace, name), timeout=60, message="children garbage-collected")
    core = client.CoreV1Api(k8s_api)
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector=f"celeryfleet.io/pool={name}").items,
        timeout=60,
        message="pods garbage-collected",
    )


def test_paused_pool_is_left_alone(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    pool = _sample("pool-minimal.yaml")
    name = pool["metadata"]["name"]
    _apply(cluster, namespace, pool)
    wait_ready(k8s_api, namespace, name)
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"paused": True}}
    )
    wait_for(
        lambda: (_condition(_pool(k8s_api, namespace, name), "Ready") or {}).get("reason") == "Paused",
        timeout=30,
        message="Ready reason Paused",
    )
    reconciles = operator.metric("celery_fleet_reconciles_total")
    apps.delete_namespaced_deployment(f"{name}-low", namespace)
    wait_for(lambda: "low" not in _deployments(k8s_api, namespace, name), timeout=30, message="low deleted")
    # The deletion wakes a reconcile of the pool: once the operator has reconciled again, the
    # Deployment must still be gone (paused), and unpausing restores it.
    wait_for(lambda: operator.metric("celery_fleet_reconciles_total") > reconciles, timeout=30,
             message="a reconcile after the deletion")  # fmt: skip
    assert "low" not in _deployments(k8s_api, namespace, name)
    client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"paused": False}}
    )
    wait_for(lambda: "low" in _deployments(k8s_api, namespace, name), timeout=30, message="low restored on unpause")


def test_pools_in_two_namespaces_are_independent(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    other = f"{namespace[:50]}-b"
    cluster.kubectl("create", "namespace", other)
    try:
        pool = _sample("pool-minimal.yaml")
        name = pool["metadata"]["name"]
        _apply(cluster, namespace, pool)
        broken = json.loads(json.dumps(pool))
        broken["spec"]["broker"] = {"urlSecretRef": {"name": "nope", "key": "url"}}
        _apply(cluster, other, broken)
        wait_ready(k8s_api, namespace, name)
        degraded = wait_for(
            lambda: _condition(_pool(k8s_api, other, name), "Degraded"), timeout=30, message="Degraded in other ns"
        )
        assert degraded["status"] == "True"
        assert not _deployments(k8s_api, other, name)
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_missing_secret_degrades_then_recovers_and_no_password_leaks(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    pool = _sample("pool-minimal.yaml")
    name = pool["metadata"]["name"]
    pool["spec"]["broker"] = {"urlSecretRef": {"name": "broker", "key": "url"}}
    _apply(cluster, namespace, pool)

    def degraded() -> dict[str, Any] | None:
        cond = _condition(_pool(k8s_api, namespace, name), "Degraded")
        return cond if cond and cond["status"] == "True" else None

    cond = wait_for(degraded, timeout=30, message="Degraded for the missing Secret")
    assert cond["reason"] == "BrokerSecretMissing"
    assert "spec.broker.urlSecretRef" in cond["message"] and "broker" in cond["message"]

    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "broker"},
            "data": {"url": base64.b64encode(f"redis://:{password}@127.0.0.1:1/0".encode()).decode()},
        },
    )
    ready = wait_ready(k8s_api, namespace, name, timeout=60)
    env = _deployments(k8s_api, namespace, name)["high"].spec.template.spec.containers[0].env
    broker_env = next(e for e in env if e.name == "CELERY_BROKER_URL")
    assert broker_env.value is None
    assert broker_env.value_from.secret_key_ref.name == "broker"

    # The password appears nowhere we publish.
    published = [
        json.dumps(ready),
        *(
            json.dumps(client.ApiClient().sanitize_for_serialization(d))
            for d in _deployments(k8s_api, namespace, name).values()
        ),
        *(f"{e.reason} {e.message}" for e in _events(k8s_api, namespace, name)),
        operator.logs(),
        operator.metrics(),
    ]
    assert not [p for p in published if password in p]
