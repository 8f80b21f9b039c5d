"""Golden files: the full manifests the operator applies, reviewed as YAML.

A change to a builder shows up as a diff of `tests/unit/golden/*.yaml`. Regenerate them after an
intended change with `UPDATE_GOLDENS=1 pytest tests/unit/test_workload_goldens.py` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.api.models import parse_beat, parse_pool
from celery_fleet.planning.beat_workload import beat_children
from celery_fleet.planning.workload import pool_children

GOLDEN_DIR = Path(__file__).parent / "golden"
UID = "7d3c1f9e-8b2a-4c5d-9e6f-0a1b2c3d4e5f"
OPERATOR_IMAGE = "ghcr.io/celery-fleet/operator:0.1.0"
# What the Secret would hold; the builders never see it, and it must never show up in what they build.
SECRET_URL = "rediss://:hunter2-s3cret@redis.shop.svc:6380/0"
SECRET_PASSWORD = "hunter2-s3cret"

RESTRICTED: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    },
}


class _GoldenDumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line strings (the probe script) as literal blocks, so a diff reads like the script.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_GoldenDumper.add_representer(str, _str)


def render(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_GoldenDumper, sort_keys=False, width=110)


def assert_matches_golden(name: str, objects: list[dict[str, Any]]) -> None:
    text = render(objects)
    path = GOLDEN_DIR / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDENS") == "1":
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `UPDATE_GOLDENS=1 pytest {__file__}` and review it")
    assert text == path.read_text(), (
        f"{path.name} differs from what the builders produce; if the change is intended, run "
        f"`UPDATE_GOLDENS=1 pytest {__file__}` and review the diff"
    )
    # A golden must stay loadable as the objects it shows.
    assert list(yaml.safe_load_all(path.read_text())) == objects


def pool_default() -> list[dict[str, Any]]:
    spec = parse_pool(
        {
            "app": "shop.celery:app",
            "image": "registry.example/shop:1.4.2",
            "broker": {"url": "redis://redis.shop.svc:6379/0"},
        }
    )
    return pool_children("shop", "prod", UID, spec)


def pool_three_tiers() -> list[dict[str, Any]]:
    spec = parse_pool(
        {
            "app": "shop.celery:app",
            "image": "registry.example/shop:1.4.2",
            "imagePullPolicy": "IfNotPresent",
            "imagePullSecrets": [{"name": "regcred"}],
            "broker": {"url": "redis://redis.shop.svc:6379/0", "globalKeyprefix": "shop:"},
            "env": [{"name": "DJANGO_SETTINGS_MODULE", "value": "shop.settings"}],
            "envFrom": [{"configMapRef": {"name": "shop-settings"}}],
            "podLabels": {"team": "payments"},
            "podAnnotations": {"prometheus.io/scrape": "false"},
            "nodeSelector": {"node-pool": "workers"},
            "tolerations": [{"key": "workers", "operator": "Exists", "effect": "NoSchedule"}],
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"celeryfleet.io/pool": "shop"}},
                }
            ],
            "priorityClassName": "celery-workers",
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            "maxTotalReplicas": 20,
            **RESTRICTED,
            "tiers": [
                {
                    "name": "realtime",
                    "queues": ["checkout", "payments"],
                    "concurrency": 4,
                    "softTimeLimitSeconds": 25,
                    "timeLimitSeconds": 30,
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                    "replicas": {"min": 2, "max": 10},
                    "podDisruptionBudget": {"minAvailable": 2},
                },
                {
                    "name": "batch",
                    "queues": ["reports"],
                    "concurrency": 8,
                    "pool": "threads",
                    "prefetchMultiplier": 2,
                    "timeLimitSeconds": 3600,
                    "logLevel": "WARNING",
                    "replicas": {"min": 1, "max": 8},
                    "podDisruptionBudget": {},
                },
                {
                    "name": "maintenance",
                    "queues": ["cleanup"],
                    "concurrency": 2,
                    "maxTasksPerChild": 100,
                    "maxMemoryPerChildKiB": 262144,
                    "extraArgs": ["--without-control"],
                    "terminationGracePeriodSeconds": 120,
                    "replicas": {"min": 0, "max": 2},
                    "podDisruptionBudget": {"maxUnavailable": "50%"},
                },
            ],
        }
    )
    return pool_children("shop", "prod", UID, spec)


def pool_secret_broker() -> list[dict[str, Any]]:
    spec = parse_pool(
        {
            "app": "shop.celery:app",
            "image": "registry.example/shop:1.4.2",
            "broker": {"urlSecretRef": {"name": "shop-broker", "key": "url"}},
            "tiers": [{"name": "default", "queues": ["celery"], "concurrency": 4, "replicas": {"min": 1, "max": 4}}],
        }
    )
    return pool_children("shop", "prod", UID, spec)


def pool_placement() -> list[dict[str, Any]]:
    """The sample with three differently placed tiers, a sidecar overlay and a command prefix."""
    sample = Path(__file__).resolve().parents[2] / "deploy" / "samples" / "pool-placement.yaml"
    obj = next(d for d in yaml.safe_load_all(sample.read_text()) if d and d["kind"] == "CeleryWorkerPool")
    return pool_children(obj["metadata"]["name"], "prod", UID, parse_pool(obj))


def beat_standby() -> list[dict[str, Any]]:
    spec = parse_beat(
        {
            "app": "shop.celery:app",
            "image": "registry.example/shop:1.4.2",
            "broker": {"urlSecretRef": {"name": "shop-broker", "key": "url"}},
            "standby": 1,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            **RESTRICTED,
        }
    )
    return beat_children("nightly", "prod", UID, spec, OPERATOR_IMAGE)


CASES = {
    "pool_default": pool_default,
    "pool_three_tiers": pool_three_tiers,
    "pool_secret_broker": pool_secret_broker,
    "pool_placement": pool_placement,
    "beat_standby": beat_standby,
}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_golden(name: str) -> None:
    assert_matches_golden(name, CASES[name]())


def test_goldens_have_no_strays() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.yaml")} == set(CASES)


def test_default_pool_is_three_deployments() -> None:
    assert [(c["kind"], c["metadata"]["name"]) for c in pool_default()] == [
        ("Deployment", "shop-high"),
        ("Deployment", "shop-medium"),
        ("Deployment", "shop-low"),
    ]


def test_three_tiers_have_their_budgets() -> None:
    kinds = [(c["kind"], c["metadata"]["name"]) for c in pool_three_tiers()]
    assert kinds == [
        ("Deployment", "shop-realtime"),
        ("PodDisruptionBudget", "shop-realtime"),
        ("Deployment", "shop-batch"),
        ("PodDisruptionBudget", "shop-batch"),
        ("Deployment", "shop-maintenance"),
        ("PodDisruptionBudget", "shop-maintenance"),
    ]


@pytest.mark.parametrize("name", ["pool_secret_broker", "beat_standby"])
def test_secret_broker_url_appears_nowhere(name: str) -> None:
    text = render(CASES[name]())
    assert SECRET_PASSWORD not in text and SECRET_URL not in text
    # Not even a URL: the only route to the broker is the Secret reference.
    assert "redis://" not in text and "rediss://" not in text
    assert "secretKeyRef:\n" in text and "name: shop-broker" in text
