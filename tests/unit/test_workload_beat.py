"""Objects built from a CeleryBeat (planning.beat_workload)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.api.models import CeleryBeatSpec, parse_beat
from celery_fleet.elector import cli as elector_cli
from celery_fleet.elector import lease_client
from celery_fleet.planning.beat_workload import (
    ELECTOR_PATH,
    ELECTOR_SOURCE,
    beat_children,
    beat_deployment,
    beat_grace_period,
    beat_names,
    stop_grace,
)
from celery_fleet.planning.workload import CONFIG_HASH_ANNOTATION

UID = "5c1d7e0a-2b6f-4f7e-8a4e-6f2d9b1c0e33"
OPERATOR_IMAGE = "ghcr.io/celery-fleet/operator:0.1.0"
BASE: dict[str, Any] = {
    "app": "shop.celery:app",
    "image": "registry.example/shop:1.4.2",
    "broker": {"url": "redis://redis.shop.svc:6379/0"},
}


def beat(**fields: Any) -> CeleryBeatSpec:
    return parse_beat({**BASE, **fields})


def children(spec: CeleryBeatSpec) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in beat_children("nightly", "prod", UID, spec, OPERATOR_IMAGE)}


def pod(spec: CeleryBeatSpec) -> dict[str, Any]:
    return dict(beat_deployment("nightly", "prod", UID, spec, OPERATOR_IMAGE)["spec"]["template"]["spec"])


def test_children_in_apply_order_all_owned_by_the_beat() -> None:
    built = beat_children("nightly", "prod", UID, beat(), OPERATOR_IMAGE)
    assert [(c["kind"], c["metadata"]["name"]) for c in built] == [
        ("ServiceAccount", "nightly-beat"),
        ("Role", "nightly-beat-lease"),
        ("RoleBinding", "nightly-beat-lease"),
        ("Lease", "nightly-beat"),
        ("Deployment", "nightly-beat"),
    ]
    for c in built:
        assert c["metadata"]["namespace"] == "prod"
        assert c["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "celeryfleet.io/v1alpha1",
                "kind": "CeleryBeat",
                "name": "nightly",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert c["metadata"]["labels"] == {
            "app.kubernetes.io/name": "celery-beat",
            "app.kubernetes.io/instance": "nightly",
            "app.kubernetes.io/component": "beat",
            "app.kubernetes.io/managed-by": "celery-fleet",
            "celeryfleet.io/beat": "nightly",
        }


def test_role_allows_only_reading_and_updating_the_one_lease() -> None:
    role = children(beat())["Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["nightly-beat"],
            "verbs": ["get", "update"],
        }
    ]


def test_role_covers_every_request_the_elector_sends_to_an_existing_lease() -> None:
    # The elector's HTTP methods, except POST (create), which it sends only when the Lease is
    # missing: RBAC cannot scope create to a name, so the operator creates the Lease instead.
    source = Path(lease_client.__file__).read_text(encoding="utf-8")
    methods = set(re.findall(r'self\._request\("([A-Z]+)"', source))
    verbs = {"GET": "get", "PUT": "update", "PATCH": "patch", "POST": "create", "DELETE": "delete"}
    assert methods - {"POST"} and {verbs[m] for m in methods - {"POST"}} == set(
        children(beat())["Role"]["rules"][0]["verbs"]
    )


@pytest.mark.parametrize(
    ("fields", "subject"),
    [
        pytest.param({}, "nightly-beat", id="own-account"),
        pytest.param({"serviceAccountName": "shop-beat"}, "shop-beat", id="user-account"),
    ],
)
def test_role_bound_to_the_account_the_pods_use(fields: dict[str, Any], subject: str) -> None:
    built = children(beat(**fields))
    assert built["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "nightly-beat-lease",
    }
    assert built["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": subject, "namespace": "prod"}]
    pod_spec = built["Deployment"]["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == subject
    assert pod_spec["automountServiceAccountToken"] is True


def test_lease_spec_is_left_to_the_electors() -> None:
    lease = children(beat(lease={"durationSeconds": 30, "renewDeadlineSeconds": 20}))["Lease"]
    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert "spec" not in lease


@pytest.mark.parametrize(("standby", "replicas"), [pytest.param(0, 1, id="alone"), pytest.param(1, 2, id="standby")])
def test_replicas_and_recreate(standby: int, replicas: int) -> None:
    d = children(beat(standby=standby))["Deployment"]
    assert d["spec"]["replicas"] == replicas
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    assert d["spec"]["selector"] == {"matchLabels": {"celeryfleet.io/beat": "nightly"}}
    assert CONFIG_HASH_ANNOTATION in d["spec"]["template"]["metadata"]["annotations"]


def test_beat_runs_under_the_elector() -> None:
    spec = beat(
        scheduler="django_celery_beat.schedulers:DatabaseScheduler",
        lease={"durationSeconds": 20, "renewDeadlineSeconds": 12, "retryPeriodSeconds": 3},
        extraArgs=["--loglevel", "DEBUG", "--max-interval", "5"],
    )
    (main,) = pod(spec)["containers"]
    assert main["name"] == "beat"
    assert "args" not in main
    assert main["command"] == [
        *("python3", ELECTOR_PATH, "--namespace", "$(POD_NAMESPACE)", "--lease", "nightly-beat"),
        *("--identity", "$(POD_NAME)", "--duration", "20", "--renew-deadline", "12", "--retry-period", "3"),
        *("--stop-grace", "4", "--service-account-dir", "/var/run/secrets/kubernetes.io/serviceaccount", "--"),
        *("celery", "-A", "shop.celery:app", "beat", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"),
        *("--schedule", "/celery-beat/celerybeat-schedule", "--loglevel", "INFO"),
        *("--loglevel", "DEBUG", "--max-interval", "5"),
    ]


def test_the_elector_accepts_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parse our command with the elector's own parser, as the pod would (minus the interpreter and path).
    spec = beat(lease={"durationSeconds": 20, "renewDeadlineSeconds": 12, "retryPeriodSeconds": 3})
    (main,) = pod(spec)["containers"]
    argv = [a.replace("$(POD_NAMESPACE)", "prod").replace("$(POD_NAME)", "nightly-beat-0") for a in main["command"][2:]]
    monkeypatch.setattr(shutil, "which", lambda _: "/usr/local/bin/celery")
    invocation = elector_cli.parse_invocation(
        argv, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert (invocation.namespace, invocation.lease, invocation.identity) == ("prod", "nightly-beat", "nightly-beat-0")
    timings = invocation.timings
    assert (timings.duration, timings.renew_deadline, timings.retry_period, timings.stop_grace) == (20, 12, 3, 4)
    assert invocation.command[:4] == ["celery", "-A", "shop.celery:app", "beat"]


@pytest.mark.parametrize(
    ("lease", "grace"),
    [
        # renew 10 + stop 2.5 + kill wait 5 + 3 release requests x 2 s + margin 5 = 28.5
        pytest.param({}, 29, id="defaults"),
        # 20 + 5 + 5 + 3 x 3 + 5
        pytest.param({"durationSeconds": 30, "renewDeadlineSeconds": 20, "retryPeriodSeconds": 3}, 44, id="slow"),
        # 2 + 0.5 + 5 + 3 x max(1, 1) + 5 = 15.5
        pytest.param({"durationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 1}, 16, id="fast"),
    ],
)
def test_grace_period_covers_stop_and_release(lease: dict[str, Any], grace: int) -> None:
    spec = beat(lease=lease)
    assert beat_grace_period(spec) == grace
    assert pod(spec)["terminationGracePeriodSeconds"] == grace
    # The elector's own rule: stop grace must keep the command inside the lease.
    assert spec.lease.renew_deadline_seconds + stop_grace(spec) < spec.lease.duration_seconds


@pytest.mark.parametrize(
    ("fields", "image"),
    [
        pytest.param({}, OPERATOR_IMAGE, id="operator-image-by-default"),
        pytest.param(
            {"electorImage": "mirror.local/celery-fleet:0.1.0"}, "mirror.local/celery-fleet:0.1.0", id="override"
        ),
    ],
)
def test_install_elector_init_container(fields: dict[str, Any], image: str) -> None:
    pod_spec = pod(beat(**fields))
    (install,) = pod_spec["initContainers"]
    assert install["name"] == "install-elector"
    assert install["image"] == image
    assert install["command"][-2:] == [ELECTOR_SOURCE, ELECTOR_PATH]
    assert install["volumeMounts"] == [{"name": "celery-fleet", "mountPath": "/celery-fleet"}]
    assert install["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (main,) = pod_spec["containers"]
    assert {"name": "celery-fleet", "mountPath": "/celery-fleet", "readOnly": True} in main["volumeMounts"]
    assert pod_spec["volumes"][:2] == [
        {"name": "celery-fleet", "emptyDir": {}},
        {"name": "beat-schedule", "emptyDir": {}},
    ]


def test_copy_command_copies(tmp_path: Path) -> None:
    (install,) = pod(beat())["initContainers"]
    source, target = tmp_path / "elector.py", tmp_path / "out" / "elector.py"
    source.write_text("print('elected')\n")
    target.parent.mkdir()
    script = install["command"][2]
    subprocess.run([sys.executable, "-c", script, str(source), str(target)], check=True)
    assert target.read_text() == "print('elected')\n"


def test_user_volumes_and_env_follow_ours() -> None:
    spec = beat(
        volumes=[{"name": "settings", "configMap": {"name": "shop"}}],
        volumeMounts=[{"name": "settings", "mountPath": "/etc/shop"}],
        env=[{"name": "TZ", "value": "UTC"}],
        resources={"requests": {"cpu": "50m"}},
    )
    pod_spec = pod(spec)
    (main,) = pod_spec["containers"]
    assert pod_spec["volumes"][-1] == {"name": "settings", "configMap": {"name": "shop"}}
    assert main["volumeMounts"][-1] == {"name": "settings", "mountPath": "/etc/shop"}
    assert [e["name"] for e in main["env"]] == ["POD_NAME", "POD_NAMESPACE", "CELERY_BROKER_URL", "TZ"]
    assert main["resources"] == {"requests": {"cpu": "50m"}}


def test_broker_url_from_secret() -> None:
    (main,) = pod(beat(broker={"urlSecretRef": {"name": "shop-broker", "key": "url"}}))["containers"]
    (broker,) = [e for e in main["env"] if e["name"] == "CELERY_BROKER_URL"]
    assert broker == {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "shop-broker", "key": "url"}}}


def test_names() -> None:
    names = beat_names("nightly")
    assert (names.service_account, names.role, names.role_binding, names.lease, names.deployment) == (
        "nightly-beat",
        "nightly-beat-lease",
        "nightly-beat-lease",
        "nightly-beat",
        "nightly-beat",
    )
