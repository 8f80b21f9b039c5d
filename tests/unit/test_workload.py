"""Worker Deployments and PDBs built from a CeleryWorkerPool (planning.workload)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from celery_fleet.api.models import CeleryWorkerPoolSpec, Tier, parse_beat, parse_pool
from celery_fleet.planning.beat_workload import beat_deployment
from celery_fleet.planning.workload import (
    BROKER_CONNECTED_PROBE,
    CONFIG_HASH_ANNOTATION,
    DEFAULT_GRACE_SECONDS,
    GRACE_MARGIN_SECONDS,
    pool_children,
    termination_grace_period,
    tier_deployment,
    tier_pdb,
    worker_args,
)

UID = "0b8f6c52-5f0e-4c1a-9d0e-3f1f5d2f7a10"
BASE: dict[str, Any] = {
    "app": "shop.celery:app",
    "image": "registry.example/shop:1.4.2",
    "broker": {"url": "redis://redis.shop.svc:6379/0"},
}


def pool(**fields: Any) -> CeleryWorkerPoolSpec:
    return parse_pool({**BASE, **fields})


def tier(**fields: Any) -> Tier:
    return Tier.model_validate(
        {"name": "t", "queues": ["q"], "concurrency": 2, "replicas": {"min": 1, "max": 3}, **fields}
    )


def deployments(spec: CeleryWorkerPoolSpec) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["labels"]["celeryfleet.io/tier"]: d
        for d in pool_children("shop", "prod", UID, spec)
        if d["kind"] == "Deployment"
    }


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def template_hash(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


# -- args ------------------------------------------------------------------------------------------

COMMON_TAIL = ["-O", "fair", "--without-gossip", "--without-mingle", "--without-heartbeat"]
NO_PREFETCH = ("--", "worker_disable_prefetch=(bool)true")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {},
            [
                *("-A", "shop.celery:app", "worker", "-Q", "q", "--concurrency", "2", "--pool", "prefork"),
                *("--prefetch-multiplier", "1", *COMMON_TAIL, "--loglevel", "INFO"),
                *("--hostname", "celery@$(POD_NAME)", *NO_PREFETCH),
            ],
            id="defaults",
        ),
        pytest.param(
            {
                "queues": ["emails", "sms"],
                "concurrency": 50,
                "pool": "gevent",
                "prefetchMultiplier": 4,
                "logLevel": "DEBUG",
            },
            [
                *("-A", "shop.celery:app", "worker", "-Q", "emails,sms", "--concurrency", "50", "--pool", "gevent"),
                *("--prefetch-multiplier", "4", *COMMON_TAIL, "--loglevel", "DEBUG"),
                *("--hostname", "celery@$(POD_NAME)", *NO_PREFETCH),
            ],
            id="queues-joined-pool-and-level",
        ),
        pytest.param(
            {
                "maxTasksPerChild": 100,
                "maxMemoryPerChildKiB": 512000,
                "softTimeLimitSeconds": 50,
                "timeLimitSeconds": 60,
            },
            [
                *("-A", "shop.celery:app", "worker", "-Q", "q", "--concurrency", "2", "--pool", "prefork"),
                *("--prefetch-multiplier", "1", "--max-tasks-per-child", "100"),
                *("--max-memory-per-child", "512000", *COMMON_TAIL),
                *("--soft-time-limit", "50", "--time-limit", "60", "--loglevel", "INFO"),
                *("--hostname", "celery@$(POD_NAME)", *NO_PREFETCH),
            ],
            id="recycling-and-time-limits",
        ),
        pytest.param(
            {"extraArgs": ["--max-tasks-per-child", "9", "--without-control"], "disablePrefetch": False},
            [
                *("-A", "shop.celery:app", "worker", "-Q", "q", "--concurrency", "2", "--pool", "prefork"),
                *("--prefetch-multiplier", "1", *COMMON_TAIL, "--loglevel", "INFO"),
                *("--hostname", "celery@$(POD_NAME)", "--max-tasks-per-child", "9", "--without-control"),
            ],
            id="extra-args-last-prefetch-off",
        ),
        pytest.param(
            {"extraArgs": ["--without-control", "--", "worker_max_tasks_per_child=9"]},
            [
                *("-A", "shop.celery:app", "worker", "-Q", "q", "--concurrency", "2", "--pool", "prefork"),
                *("--prefetch-multiplier", "1", *COMMON_TAIL, "--loglevel", "INFO"),
                *("--hostname", "celery@$(POD_NAME)", "--without-control", "--", "worker_max_tasks_per_child=9"),
                "worker_disable_prefetch=(bool)true",
            ],
            id="settings-after-the-users-own-double-dash",
        ),
    ],
)
def test_worker_args(fields: dict[str, Any], expected: list[str]) -> None:
    assert worker_args("shop.celery:app", tier(**fields)) == expected


def test_worker_runs_celery_in_exec_form() -> None:
    c = container(deployments(pool())["high"])
    assert c["name"] == "worker"
    assert c["command"] == ["celery"]
    assert c["args"][:3] == ["-A", "shop.celery:app", "worker"]


# -- grace period ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, DEFAULT_GRACE_SECONDS, id="no-limits-default"),
        pytest.param({"timeLimitSeconds": 600}, 600 + GRACE_MARGIN_SECONDS, id="hard-limit-plus-margin"),
        pytest.param(
            {"softTimeLimitSeconds": 500, "timeLimitSeconds": 600},
            600 + GRACE_MARGIN_SECONDS,
            id="hard-limit-wins-over-soft",
        ),
        pytest.param({"softTimeLimitSeconds": 40}, 40 + GRACE_MARGIN_SECONDS, id="soft-limit-only"),
        pytest.param({"timeLimitSeconds": 600, "terminationGracePeriodSeconds": 900}, 900, id="explicit-value-wins"),
        pytest.param({"terminationGracePeriodSeconds": 0}, 0, id="explicit-zero-kept"),
    ],
)
def test_termination_grace_period(fields: dict[str, Any], expected: int) -> None:
    t = tier(**fields)
    assert termination_grace_period(t) == expected
    d = tier_deployment("shop", "prod", UID, pool(tiers=[t.model_dump(by_alias=True)]), t)
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected


# -- replicas: one writer --------------------------------------------------------------------------


def test_replicas_omitted_when_none() -> None:
    spec = pool()
    d = tier_deployment("shop", "prod", UID, spec, spec.tiers[0], None)
    assert "replicas" not in d["spec"]
    assert all("replicas" not in child["spec"] for child in pool_children("shop", "prod", UID, spec))


def test_replicas_included_when_given_and_hash_ignores_them() -> None:
    spec = pool()
    without = tier_deployment("shop", "prod", UID, spec, spec.tiers[0], None)
    with_three = tier_deployment("shop", "prod", UID, spec, spec.tiers[0], 3)
    assert with_three["spec"]["replicas"] == 3
    assert with_three["spec"]["template"] == without["spec"]["template"]


def test_pool_children_replicas_only_for_named_tiers() -> None:
    spec = pool()
    found = {
        c["metadata"]["name"]: c["spec"].get("replicas")
        for c in pool_children("shop", "prod", UID, spec, {"medium": 4})
    }
    assert found == {"shop-high": None, "shop-medium": 4, "shop-low": None}


# -- config hash -----------------------------------------------------------------------------------


def default_tiers_with(**changes: dict[str, Any]) -> list[dict[str, Any]]:
    tiers = [t.model_dump(by_alias=True, exclude_none=True) for t in pool().tiers]
    for t in tiers:
        t.update(changes.get(t["name"], {}))
    return tiers


@pytest.mark.parametrize(
    ("changes", "rolled"),
    [
        pytest.param({"medium": {"concurrency": 8}}, {"medium"}, id="concurrency-rolls-that-tier"),
        pytest.param({"low": {"timeLimitSeconds": 60}}, {"low"}, id="time-limit-rolls-that-tier"),
        pytest.param({"high": {"resources": {"limits": {"memory": "1Gi"}}}}, {"high"}, id="resources"),
        pytest.param({"high": {"replicas": {"min": 3, "max": 20}}}, set(), id="replica-bounds-roll-nothing"),
        pytest.param({"medium": {"autoscaling": {"targetDepthPerReplica": 50}}}, set(), id="autoscaling-rolls-nothing"),
        pytest.param({"low": {"podDisruptionBudget": {"maxUnavailable": 2}}}, set(), id="budget-rolls-nothing"),
    ],
)
def test_config_hash_changes_for_the_changed_tier_only(changes: dict[str, Any], rolled: set[str]) -> None:
    before = {name: template_hash(d) for name, d in deployments(pool()).items()}
    after = {name: template_hash(d) for name, d in deployments(pool(tiers=default_tiers_with(**changes))).items()}
    assert {name for name in before if before[name] != after[name]} == rolled


def test_pool_wide_change_rolls_every_tier() -> None:
    before = {name: template_hash(d) for name, d in deployments(pool()).items()}
    after = {name: template_hash(d) for name, d in deployments(pool(image="registry.example/shop:1.5.0")).items()}
    assert all(before[name] != after[name] for name in before)


def test_config_hash_is_stable() -> None:
    assert deployments(pool()) == deployments(pool())


# -- metadata, selector, owner ---------------------------------------------------------------------


def test_labels_selector_and_owner() -> None:
    d = deployments(pool(podLabels={"team": "payments", "celeryfleet.io/tier": "evil"}))["low"]
    assert d["metadata"]["name"] == "shop-low"
    assert d["metadata"]["namespace"] == "prod"
    assert d["metadata"]["labels"] == {
        "app.kubernetes.io/name": "celery-worker",
        "app.kubernetes.io/instance": "shop",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "celery-fleet",
        "celeryfleet.io/pool": "shop",
        "celeryfleet.io/tier": "low",
    }
    assert d["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "celeryfleet.io/v1alpha1",
            "kind": "CeleryWorkerPool",
            "name": "shop",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector == {"celeryfleet.io/pool": "shop", "celeryfleet.io/tier": "low"}
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    # Operator labels win, so the pods always match the selector.
    assert selector.items() <= pod_labels.items()
    assert pod_labels["team"] == "payments"
    assert d["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


def test_user_pod_fields_are_copied() -> None:
    fields: dict[str, Any] = {
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccountName": "shop-workers",
        "podAnnotations": {"prometheus.io/scrape": "false"},
        "nodeSelector": {"pool": "workers"},
        "tolerations": [{"key": "workers", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "priorityClassName": "high",
        "securityContext": {"runAsNonRoot": True},
        "containerSecurityContext": {"readOnlyRootFilesystem": True},
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "envFrom": [{"configMapRef": {"name": "shop-settings"}}],
    }
    d = deployments(pool(**fields))["high"]
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "shop-workers"
    assert "automountServiceAccountToken" not in pod  # the user chose an account: theirs to configure
    assert pod["nodeSelector"] == {"pool": "workers"}
    assert pod["tolerations"] == fields["tolerations"]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["topologySpreadConstraints"] == fields["topologySpreadConstraints"]
    assert pod["priorityClassName"] == "high"
    assert pod["securityContext"] == {"runAsNonRoot": True}
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert c["imagePullPolicy"] == "Always"
    assert c["securityContext"] == {"readOnlyRootFilesystem": True}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert c["envFrom"] == [{"configMapRef": {"name": "shop-settings"}}]
    annotations = d["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"
    assert CONFIG_HASH_ANNOTATION in annotations


def test_unset_fields_are_left_out() -> None:
    # An empty list we send comes back absent, which a drift check would report forever.
    d = deployments(pool())["high"]
    pod = d["spec"]["template"]["spec"]
    assert set(pod) == {"automountServiceAccountToken", "terminationGracePeriodSeconds", "containers"}
    assert pod["automountServiceAccountToken"] is False
    assert set(container(d)) == {"name", "image", "command", "args", "env", "readinessProbe"}
    assert not [v for v in walk(d) if v in ([], {}, None, "")]


# -- environment and the broker URL ----------------------------------------------------------------


def test_env_order_identity_broker_then_user() -> None:
    d = deployments(pool(env=[{"name": "DJANGO_SETTINGS_MODULE", "value": "shop.settings"}]))["high"]
    assert container(d)["env"] == [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "CELERY_BROKER_URL", "value": "redis://redis.shop.svc:6379/0"},
        {"name": "DJANGO_SETTINGS_MODULE", "value": "shop.settings"},
    ]


def test_broker_url_from_secret_is_a_reference() -> None:
    spec = pool(broker={"urlSecretRef": {"name": "shop-broker", "key": "url"}})
    for d in deployments(spec).values():
        (broker,) = [e for e in container(d)["env"] if e["name"] == "CELERY_BROKER_URL"]
        assert broker == {
            "name": "CELERY_BROKER_URL",
            "valueFrom": {"secretKeyRef": {"name": "shop-broker", "key": "url"}},
        }
        assert not [v for v in walk(d) if isinstance(v, str) and "redis://" in v]


# -- pod disruption budgets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        pytest.param(None, None, id="unset-none"),
        pytest.param({"enabled": False, "maxUnavailable": 2}, None, id="disabled-none"),
        pytest.param({}, {"maxUnavailable": 1}, id="default-max-unavailable-1"),
        pytest.param({"maxUnavailable": "25%"}, {"maxUnavailable": "25%"}, id="percent"),
        pytest.param({"minAvailable": 2}, {"minAvailable": 2}, id="min-available"),
    ],
)
def test_tier_pdb(budget: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    t = tier(podDisruptionBudget=budget) if budget is not None else tier()
    pdb = tier_pdb("shop", "prod", UID, t)
    if expected is None:
        assert pdb is None
        return
    assert pdb is not None
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == "shop-t"
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "CeleryWorkerPool"
    assert pdb["spec"] == {
        **expected,
        "selector": {"matchLabels": {"celeryfleet.io/pool": "shop", "celeryfleet.io/tier": "t"}},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }


# -- readiness probe: a local check of the broker connection ---------------------------------------

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def tcp_row(remote_port: int, state: str) -> str:
    return f"   0: 0A01A8C0:9C40 0B01A8C0:{remote_port:04X} {state} 00000000:00000000 00:00000000 00000000  1000\n"


def tcp6_row(remote_port: int, state: str) -> str:
    addr = "0000000000000000FFFF00000B01A8C0"
    return f"   0: {addr}:9C40 {addr}:{remote_port:04X} {state} 00000000:00000000 00:00000000 00000000  1000\n"


@pytest.mark.parametrize(
    ("url", "tables", "ready"),
    [
        pytest.param("redis://redis:6379/0", {"/proc/net/tcp": HEADER + tcp_row(6379, "01")}, True, id="connected"),
        pytest.param("redis://redis:6379/0", {"/proc/net/tcp": HEADER + tcp_row(6379, "06")}, False, id="time-wait"),
        pytest.param("redis://redis:6379/0", {"/proc/net/tcp": HEADER + tcp_row(6380, "01")}, False, id="other-port"),
        pytest.param("redis://redis/0", {"/proc/net/tcp": HEADER + tcp_row(6379, "01")}, True, id="default-port"),
        pytest.param(
            "rediss://:pw@redis:6380/0",
            {"/proc/net/tcp": HEADER, "/proc/net/tcp6": HEADER + tcp6_row(6380, "01")},
            True,
            id="tls-over-ipv6",
        ),
        pytest.param("redis://redis:6379/0", {}, False, id="no-tables"),
        pytest.param(
            "redis://a:7000/0;redis://b:7001/0",
            {"/proc/net/tcp": HEADER + tcp_row(7000, "01")},
            True,
            id="failover-list-first-url",
        ),
        pytest.param("sentinel://s:26379", {}, True, id="unknown-scheme-ready"),
        pytest.param("redis://:p:w@redis:port/0", {}, True, id="unparsable-ready-and-silent"),
    ],
)
def test_broker_readiness_probe(
    url: str,
    tables: dict[str, str],
    ready: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fake_open(path: str) -> io.StringIO:
        if path not in tables:
            raise FileNotFoundError(path)
        return io.StringIO(tables[path])

    monkeypatch.setenv("CELERY_BROKER_URL", url)
    with pytest.raises(SystemExit) as exited:
        exec(compile(BROKER_CONNECTED_PROBE, "<probe>", "exec"), {"open": fake_open})
    assert (exited.value.code in (0, None)) is ready
    out = capsys.readouterr().out
    # Probe output lands in Events: it may name the port, never the URL.
    assert "redis" not in out and "pw" not in out
    if not ready:
        assert "no established connection to the broker port" in out


# -- PodSecurity "restricted" ----------------------------------------------------------------------

RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The checks of the Pod Security Standards' restricted profile that our objects can affect."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: {kinds}")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(key)
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation != false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{c['name']}: capabilities.drop lacks ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: adds capabilities")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{c['name']}: runAsNonRoot not true")
        if sc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccompProfile not RuntimeDefault/Localhost")
        if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            problems.append(f"{c['name']}: hostPort")
    return problems


RESTRICTED_USER_SPEC: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
}


def test_restricted_user_spec_gives_restricted_worker_pods() -> None:
    for d in deployments(pool(**RESTRICTED_USER_SPEC)).values():
        assert restricted_violations(d["spec"]["template"]["spec"]) == []


def test_restricted_user_spec_gives_restricted_beat_pods() -> None:
    d = beat_deployment("shop", "prod", UID, parse_beat({**BASE, **RESTRICTED_USER_SPEC}), "op:1")
    assert restricted_violations(d["spec"]["template"]["spec"]) == []


def test_restricted_is_not_forced_on_the_user() -> None:
    # The user's containers follow their spec; only the container we add is locked down.
    d = beat_deployment("shop", "prod", UID, parse_beat(BASE), "op:1")
    problems = restricted_violations(d["spec"]["template"]["spec"])
    assert problems and all(p.startswith("beat:") for p in problems)
    assert restricted_violations(deployments(pool())["high"]["spec"]["template"]["spec"])
