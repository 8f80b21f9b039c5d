"""Issue 26: per-tier pod fields merged over the pool's, rollout, monitoring flags, command prefix and
the pod-template overlay, as the builder writes them (the models' MERGE_RULE, held here per field)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.api.models import parse_pool
from celery_fleet.planning.overlay import merge
from celery_fleet.planning.workload import CONFIG_HASH_ANNOTATION, tier_deployment

POOL: dict[str, Any] = {
    "app": "shop.celery:app",
    "image": "pool:1",
    "broker": {"url": "redis://r:6379/0"},
    "env": [{"name": "A", "value": "pool"}, {"name": "B", "value": "pool"}],
    "envFrom": [{"configMapRef": {"name": "pool-settings"}}],
    "podLabels": {"team": "shop", "cost": "pool"},
    "podAnnotations": {"a": "pool"},
    "nodeSelector": {"os": "linux", "pool": "general"},
    "tolerations": [{"key": "workers", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {"x": 1}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
    "priorityClassName": "normal",
}
TIER: dict[str, Any] = {"name": "t", "queues": ["q"], "concurrency": 2, "replicas": {"min": 0, "max": 3}}


def build(tier: dict[str, Any], **pool: Any) -> dict[str, Any]:
    spec = parse_pool({**POOL, **pool, "tiers": [{**TIER, **tier}]})
    deployment: dict[str, Any] = tier_deployment("shop", "prod", "uid", spec, spec.tiers[0])
    return deployment


def pod(tier: dict[str, Any], **pool: Any) -> dict[str, Any]:
    spec: dict[str, Any] = build(tier, **pool)["spec"]["template"]["spec"]
    return spec


def worker(tier: dict[str, Any], **pool: Any) -> dict[str, Any]:
    container: dict[str, Any] = pod(tier, **pool)["containers"][0]
    assert container["name"] == "worker"
    return container


def labels(tier: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = build(tier)["spec"]["template"]["metadata"]["labels"]
    return found


def annotations(tier: dict[str, Any]) -> dict[str, str]:
    found = dict(build(tier)["spec"]["template"]["metadata"]["annotations"])
    del found[CONFIG_HASH_ANNOTATION]
    return found


def user_env(tier: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["name"], e["value"]) for e in worker(tier)["env"] if e["name"] in ("A", "B", "C")]


@pytest.mark.parametrize(
    ("tier", "read", "expected"),
    [
        pytest.param({}, lambda t: worker(t)["image"], "pool:1", id="image-inherited"),
        pytest.param({"image": "gpu:1"}, lambda t: worker(t)["image"], "gpu:1", id="image-replaced"),
        pytest.param(
            {"env": [{"name": "B", "value": "tier"}, {"name": "C", "value": "tier"}]},
            user_env,
            [("A", "pool"), ("B", "tier"), ("C", "tier")],
            id="env-merged-by-name-tier-wins",
        ),
        pytest.param(
            {"envFrom": [{"secretRef": {"name": "gpu-keys"}}]},
            lambda t: worker(t)["envFrom"],
            [{"configMapRef": {"name": "pool-settings"}}, {"secretRef": {"name": "gpu-keys"}}],
            id="envFrom-appended",
        ),
        pytest.param(
            {"nodeSelector": {"pool": "gpu", "accelerator": "l4"}},
            lambda t: pod(t)["nodeSelector"],
            {"os": "linux", "pool": "gpu", "accelerator": "l4"},
            id="nodeSelector-merged-by-key",
        ),
        pytest.param(
            {"podLabels": {"cost": "gpu"}},
            lambda t: {k: labels(t)[k] for k in ("team", "cost")},
            {"team": "shop", "cost": "gpu"},
            id="podLabels-merged-by-key",
        ),
        pytest.param(
            {"podLabels": {"celeryfleet.io/tier": "other"}},
            lambda t: labels(t)["celeryfleet.io/tier"],
            "t",
            id="podLabels-never-override-the-selector",
        ),
        pytest.param({"podAnnotations": {"b": "tier"}}, annotations, {"a": "pool", "b": "tier"}, id="annotations"),
        pytest.param(
            {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
            lambda t: pod(t)["tolerations"],
            [{"key": "gpu", "operator": "Exists"}],
            id="tolerations-replaced",
        ),
        pytest.param({"tolerations": []}, lambda t: "tolerations" in pod(t), False, id="tolerations-cleared"),
        pytest.param({}, lambda t: pod(t)["tolerations"], POOL["tolerations"], id="tolerations-inherited"),
        pytest.param(
            {"affinity": {"podAntiAffinity": {"y": 2}}},
            lambda t: pod(t)["affinity"],
            {"podAntiAffinity": {"y": 2}},
            id="affinity-replaced",
        ),
        pytest.param(
            {"topologySpreadConstraints": []},
            lambda t: "topologySpreadConstraints" in pod(t),
            False,
            id="spread-cleared",
        ),
        pytest.param({"priorityClassName": "gpu"}, lambda t: pod(t)["priorityClassName"], "gpu", id="priority"),
    ],
)
def test_tier_pod_fields_follow_the_merge_rule(tier: dict[str, Any], read: Any, expected: Any) -> None:
    assert read(tier) == expected


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        pytest.param(None, {"maxUnavailable": 0, "maxSurge": 1}, id="default-unchanged"),
        pytest.param({"maxSurge": "25%"}, {"maxUnavailable": 0, "maxSurge": "25%"}, id="surge-only"),
        pytest.param({"maxSurge": 0, "maxUnavailable": 2}, {"maxUnavailable": 2, "maxSurge": 0}, id="no-surge"),
    ],
)
def test_rollout_strategy_per_tier(rollout: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    tier = {"rollout": rollout} if rollout else {}
    assert build(tier)["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": expected}


@pytest.mark.parametrize(
    ("monitoring", "present", "absent"),
    [
        pytest.param(
            None,
            ["--without-gossip", "--without-mingle", "--without-heartbeat"],
            ["--task-events"],
            id="default-all-off",
        ),
        pytest.param(
            {"events": True, "heartbeat": True},
            ["--task-events", "--without-gossip", "--without-mingle"],
            ["--without-heartbeat"],
            id="flower",
        ),
        pytest.param(
            {"gossip": True, "mingle": True},
            ["--without-heartbeat"],
            ["--without-gossip", "--without-mingle", "--task-events"],
            id="gossip-mingle",
        ),
    ],
)
def test_monitoring_flags(monitoring: dict[str, Any] | None, present: list[str], absent: list[str]) -> None:
    args = worker({"monitoring": monitoring} if monitoring else {})["args"]
    assert all(flag in args for flag in present) and not any(flag in args for flag in absent)
    # Before `--`: Celery reads what follows as settings.
    assert all(args.index(flag) < args.index("--") for flag in present)


@pytest.mark.parametrize(
    ("pool_prefix", "tier_prefix", "command"),
    [
        pytest.param(None, None, ["celery"], id="none"),
        pytest.param(["ddtrace-run"], None, ["ddtrace-run", "celery"], id="pool"),
        pytest.param(
            ["ddtrace-run"],
            ["newrelic-admin", "run-program"],
            ["newrelic-admin", "run-program", "celery"],
            id="tier-replaces-pool",
        ),
        pytest.param(["ddtrace-run"], [], ["celery"], id="tier-clears"),
    ],
)
def test_command_prefix(pool_prefix: list[str] | None, tier_prefix: list[str] | None, command: list[str]) -> None:
    pool = {"commandPrefix": pool_prefix} if pool_prefix is not None else {}
    tier = {"commandPrefix": tier_prefix} if tier_prefix is not None else {}
    container = worker(tier, **pool)
    assert container["command"] == command
    assert "celery@$(POD_NAME)" in container["args"]  # the node name the census asks is untouched


SIDECAR = {"name": "otel", "image": "otel/collector:0.1"}


def test_overlay_merges_the_worker_by_name_and_adds_sidecars_pool_then_tier() -> None:
    pool_overlay = {
        "spec": {
            "containers": [{"name": "worker", "startupProbe": {"exec": {"command": ["true"]}}}, SIDECAR],
            "initContainers": [{"name": "migrate", "image": "pool:1"}],
            "runtimeClassName": "gvisor",
            "dnsConfig": {"options": [{"name": "ndots", "value": "2"}]},
        },
        "metadata": {"annotations": {"from": "pool"}, "labels": {"sidecar": "otel"}},
    }
    tier_overlay = {
        "spec": {"containers": [{"name": "otel", "image": "otel/collector:0.2"}], "runtimeClassName": "kata"}
    }
    got = pod({"podTemplate": tier_overlay}, podTemplate=pool_overlay)
    plain = pod({})
    worker_container, sidecar = got["containers"]
    assert worker_container["startupProbe"] == {"exec": {"command": ["true"]}}
    assert {k: v for k, v in worker_container.items() if k != "startupProbe"} == plain["containers"][0]
    assert sidecar == {"name": "otel", "image": "otel/collector:0.2"}  # the tier's overlay goes last
    assert got["initContainers"] == [{"name": "migrate", "image": "pool:1"}]
    assert got["runtimeClassName"] == "kata"
    assert got["dnsConfig"] == pool_overlay["spec"]["dnsConfig"]
    assert annotations({"podTemplate": pool_overlay})["from"] == "pool"
    assert labels({"podTemplate": pool_overlay})["sidecar"] == "otel"


def test_overlay_changes_the_config_hash_so_pods_roll() -> None:
    before = build({})["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    after = build({"podTemplate": {"spec": {"containers": [SIDECAR]}}})["spec"]["template"]["metadata"]
    assert after["annotations"][CONFIG_HASH_ANNOTATION] != before


@pytest.mark.parametrize(
    ("base", "overlay", "expected"),
    [
        pytest.param({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}, {"a": {"b": 1, "c": 3}}, id="maps-by-key"),
        pytest.param({"args": [1, 2]}, {"args": [3]}, {"args": [3]}, id="plain-lists-replace"),
        pytest.param({"a": 1}, {"a": None}, {"a": 1}, id="null-leaves-base"),
        pytest.param(
            {"volumeMounts": [{"mountPath": "/a", "name": "x"}]},
            {"volumeMounts": [{"mountPath": "/a", "readOnly": True}, {"mountPath": "/b", "name": "y"}]},
            {"volumeMounts": [{"mountPath": "/a", "name": "x", "readOnly": True}, {"mountPath": "/b", "name": "y"}]},
            id="volumeMounts-by-mountPath",
        ),
        pytest.param(
            {"env": [{"name": "A", "value": "1"}]},
            {"env": [{"name": "A", "valueFrom": {"x": 1}}]},
            {"env": [{"name": "A", "value": "1", "valueFrom": {"x": 1}}]},
            id="env-by-name",
        ),
    ],
)
def test_strategic_merge(base: dict[str, Any], overlay: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge(base, overlay) == expected
    assert merge(base, {}) == base


def test_what_the_model_depends_on_survives_an_overlay_stored_before_the_rules() -> None:
    # Built without validation, as an object stored before the overlay rules existed would be.
    spec = parse_pool({**POOL, "broker": {"url": "rediss://r:6380/0", "tls": {"ca": {"secretName": "ca", "key": "ca"}}},
                       "tiers": [TIER]})  # fmt: skip
    plain = tier_deployment("shop", "prod", "uid", spec, spec.tiers[0])["spec"]["template"]
    from celery_fleet.api.models import ContainerOverlay, PodMetadataOverlay, PodSpecOverlay, PodTemplateOverlay

    worker_overlay = ContainerOverlay.model_construct(
        name="worker", command=["sh"], args=["-n", "x"], env=[{"name": "A", "value": "x"}], image="other:1"
    )
    overlay = PodTemplateOverlay.model_construct(
        metadata=PodMetadataOverlay.model_construct(labels={"celeryfleet.io/tier": "x"}, annotations=None),
        spec=PodSpecOverlay.model_construct(
            containers=[worker_overlay],
            init_containers=None,
            termination_grace_period_seconds=1,
            volumes=[{"name": "celery-fleet-broker-tls", "emptyDir": {}}],
        ),
    )
    tier = spec.tiers[0].model_copy(update={"pod_template": overlay})
    got = tier_deployment("shop", "prod", "uid", spec, tier)["spec"]["template"]
    for key in ("image", "command", "args", "env"):
        assert got["spec"]["containers"][0][key] == plain["spec"]["containers"][0][key], key
    assert got["metadata"]["labels"] == plain["metadata"]["labels"]
    assert got["spec"]["terminationGracePeriodSeconds"] == plain["spec"]["terminationGracePeriodSeconds"]
    assert got["spec"]["volumes"] == plain["spec"]["volumes"]
