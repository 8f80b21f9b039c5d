"""Issue 26: what a pod overlay or a tier's pod fields may not change is refused, naming the field
(the same rules run as CEL at admission: tests/integration/test_api_rules.py)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from celery_fleet.api.crdgen import generate_crds
from celery_fleet.api.models import MERGE_RULE, InvalidSpec, parse_pool

BASE: dict[str, Any] = {
    "app": "shop.celery:app",
    "image": "img:1",
    "broker": {"url": "redis://r:6379/0"},
    "tiers": [{"name": "t", "queues": ["q"], "concurrency": 2, "replicas": {"min": 0, "max": 3}}],
}


def problems(pool: dict[str, Any] | None = None, tier: dict[str, Any] | None = None) -> list[str]:
    spec = {**BASE, **(pool or {}), "tiers": [{**BASE["tiers"][0], **(tier or {})}]}
    with pytest.raises(InvalidSpec) as refused:
        parse_pool(spec)
    return refused.value.problems


def containers(*items: dict[str, Any]) -> dict[str, Any]:
    return {"podTemplate": {"spec": {"containers": list(items)}}}


@pytest.mark.parametrize(
    ("pool", "tier", "where", "says"),
    [
        pytest.param(containers({"name": "worker", "args": ["-n", "x"]}), None,
                     "spec.podTemplate.spec.containers[0].args", "node name, queues", id="pool-overlay-args"),
        pytest.param(None, containers({"name": "proxy"}, {"name": "worker", "command": ["sh"]}),
                     "spec.tiers[0].podTemplate.spec.containers[1].command", "commandPrefix",
                     id="tier-overlay-command"),
        pytest.param(containers({"name": "worker", "env": [{"name": "CELERY_BROKER_URL", "value": "x"}]}), None,
                     "spec.podTemplate.spec.containers[0].env", "spec.tiers[].env", id="overlay-worker-env"),
        pytest.param({"podTemplate": {"metadata": {"labels": {"celeryfleet.io/tier": "x"}}}}, None,
                     "spec.podTemplate.metadata.labels", "selects the tier's pods", id="selector-label"),
        pytest.param(None, {"podTemplate": {"spec": {"terminationGracePeriodSeconds": 1}}},
                     "spec.tiers[0].podTemplate.spec.terminationGracePeriodSeconds", "time limits", id="grace"),
        pytest.param(None, containers({"image": "x"}), "spec.tiers[0].podTemplate.spec.containers[0].name",
                     "required", id="container-needs-its-merge-key"),
        pytest.param(None, {"rollout": {"maxSurge": "0%"}}, "spec.tiers[0].rollout.maxSurge", "both be 0",
                     id="rollout-that-cannot-progress"),
        pytest.param(None, {"env": [{"name": "CELERY_WORKER_AUTOSCALE", "value": "4,1"}]},
                     "spec.tiers[0].env[0].name", "celery worker", id="tier-env-worker-option"),
        pytest.param(None, {"env": [{"name": "POD_NAME", "value": "x"}]}, "spec.tiers[0].env[0].name",
                     "set by the operator", id="tier-env-operator-name"),
    ],
)  # fmt: skip
def test_refused_naming_the_field(pool: dict[str, Any] | None, tier: dict[str, Any] | None, where: str,
                                  says: str) -> None:  # fmt: skip
    found = problems(pool, tier)
    assert any(p.startswith(f"{where}: ") and says in p for p in found), found


@pytest.mark.parametrize(
    ("pool", "tier"),
    [
        pytest.param(containers({"name": "worker", "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}),
                     None, id="worker-lifecycle"),
        pytest.param(None, containers({"name": "sidecar", "image": "x", "command": ["run"], "args": ["-n", "1"]}),
                     id="sidecar-command-args"),
        pytest.param({"podTemplate": {"spec": {"initContainers": [{"name": "worker", "command": ["migrate"]}]}}},
                     None, id="init-container-named-worker"),
        pytest.param(None, {"rollout": {"maxSurge": 0, "maxUnavailable": "25%"}}, id="rollout-without-surge"),
    ],
)  # fmt: skip
def test_accepted(pool: dict[str, Any] | None, tier: dict[str, Any] | None) -> None:
    parse_pool({**BASE, **(pool or {}), "tiers": [{**BASE["tiers"][0], **(tier or {})}]})


def test_the_crd_states_the_merge_rule_and_passes_the_overlay_through() -> None:
    crd = yaml.safe_load(yaml.safe_dump(generate_crds()))
    pool = next(c for c in crd.values() if c["spec"]["names"]["kind"] == "CeleryWorkerPool")
    spec = pool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert MERGE_RULE in spec["properties"]["tiers"]["description"]
    overlay = spec["properties"]["tiers"]["items"]["properties"]["podTemplate"]["properties"]["spec"]
    assert overlay["x-kubernetes-preserve-unknown-fields"] is True
    assert overlay["properties"]["containers"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
