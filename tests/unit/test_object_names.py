"""Issue 13 item 1: every object name in both kinds is a Kubernetes object name, in the models
as at admission, with an error naming the field (the CRD side is tested against the apiserver
in tests/integration/test_tenancy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.api import crdgen
from celery_fleet.api.models import (
    DNS_SUBDOMAIN,
    OBJECT_NAME_RULE,
    InvalidSpec,
    parse_beat,
    parse_pool,
)

TRAVERSAL = "../../other-team/secrets/redis"
CRDS = crdgen.generate_crds()


def _spec(**fields: Any) -> dict[str, Any]:
    return {"app": "a", "image": "i", "broker": {"url": "redis://r:6379/0"}, **fields}


BAD_NAMES = [
    pytest.param({"broker": {"urlSecretRef": {"name": TRAVERSAL, "key": "url"}}}, "spec.broker.urlSecretRef.name",
                 id="broker-secret-traversal"),
    pytest.param({"broker": {"urlSecretRef": {"name": "UPPER", "key": "url"}}}, "spec.broker.urlSecretRef.name",
                 id="broker-secret-uppercase"),
    pytest.param({"broker": {"urlSecretRef": {"name": "s%2F..", "key": "url"}}}, "spec.broker.urlSecretRef.name",
                 id="broker-secret-percent-encoded"),
    pytest.param({"broker": {"urlSecretRef": {"name": "..", "key": "url"}}}, "spec.broker.urlSecretRef.name",
                 id="broker-secret-dot-dot"),
    pytest.param({"serviceAccountName": "../default"}, "spec.serviceAccountName", id="service-account"),
    pytest.param({"priorityClassName": "system/cluster-critical"}, "spec.priorityClassName", id="priority-class"),
    pytest.param({"imagePullSecrets": [{"name": "ok"}, {"name": "../x"}]}, "spec.imagePullSecrets[1].name",
                 id="pull-secret"),
    pytest.param({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": TRAVERSAL, "key": "k"}}}]},
                 "spec.env[0].valueFrom.secretKeyRef.name", id="env-secret"),
    pytest.param({"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "a/b", "key": "k"}}}]},
                 "spec.env[0].valueFrom.configMapKeyRef.name", id="env-config-map"),
    pytest.param({"envFrom": [{"secretRef": {"name": 7}}]}, "spec.envFrom[0].secretRef.name", id="env-from-not-str"),
    pytest.param({"envFrom": [{"configMapRef": {"name": "c" * 254}}]}, "spec.envFrom[0].configMapRef.name",
                 id="env-from-too-long"),
    pytest.param({"volumes": [{"name": "v", "secret": {"secretName": TRAVERSAL}}]}, "spec.volumes[0].secret.secretName",
                 id="volume-secret"),
    pytest.param({"volumes": [{"name": "v", "configMap": {"name": ".."}}]}, "spec.volumes[0].configMap.name",
                 id="volume-config-map"),
    pytest.param({"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "x/y"}}]},
                 "spec.volumes[0].persistentVolumeClaim.claimName", id="volume-claim"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "field"), BAD_NAMES)
@pytest.mark.parametrize("parse", [parse_pool, parse_beat], ids=["pool", "beat"])
def test_a_bad_object_name_is_refused_naming_the_field_and_the_fix(
    parse: Any, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse(_spec(**fields))
    assert f"{field}: {OBJECT_NAME_RULE}" in caught.value.problems, caught.value.problems


GOOD = {
    "broker": {"urlSecretRef": {"name": "shop-broker.v2", "key": "url"}},
    "serviceAccountName": "worker",
    "priorityClassName": "high-priority",
    "imagePullSecrets": [{"name": "regcred"}],
    "env": [
        {"name": "PLAIN", "value": "x"},
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "settings"}}, {"prefix": "X_", "secretRef": {"name": "more"}}],
    "volumes": [{"name": "v", "configMap": {"name": "c"}}, {"name": "e", "emptyDir": {}}],
}


def test_valid_names_pass_and_pass_through_unchanged() -> None:
    spec = parse_pool(_spec(**GOOD))
    assert spec.env == GOOD["env"] and spec.volumes == GOOD["volumes"] and spec.env_from == GOOD["envFrom"]
    assert spec.image_pull_secrets == GOOD["imagePullSecrets"]
    parse_beat(_spec(**GOOD))


def _node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


@pytest.mark.parametrize("crd", [crdgen.POOL_FILE, crdgen.BEAT_FILE])
def test_the_crds_check_the_same_names(crd: str) -> None:
    spec = CRDS[crd]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path in ("broker.urlSecretRef.name", "serviceAccountName", "priorityClassName"):
        rules = _node(spec, path)["x-kubernetes-validations"]
        assert {"rule": f"self.matches('{DNS_SUBDOMAIN}')", "message": OBJECT_NAME_RULE} in rules, path
    for path in (
        "imagePullSecrets.[].name",
        "env.[].valueFrom.secretKeyRef.name",
        "env.[].valueFrom.configMapKeyRef.name",
        "envFrom.[].secretRef.name",
        "envFrom.[].configMapRef.name",
        "volumes.[].secret.secretName",
        "volumes.[].configMap.name",
        "volumes.[].persistentVolumeClaim.claimName",
    ):
        assert _node(spec, path)["pattern"] == DNS_SUBDOMAIN, path
    # Free-form pod objects keep every other field.
    assert _node(spec, "env.[]")["x-kubernetes-preserve-unknown-fields"] is True
